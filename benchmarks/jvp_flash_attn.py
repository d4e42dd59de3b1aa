"""The attention tangent inside MeanFlow's JVP: the DiT's closed form against jvp_flash_attention (issue 17.5).

MeanFlow's du/dt needs d attention(q, k, v) along (dq, dk, dv). The DiT's hand-written JVP (plugins/dit/jvp.py,
`attention_tangent`) materialises P = softmax(q k^T / sqrt(d)), (B, H, N, N), which grows with the square of the
token count: at 1024 tokens (DiT-B/2 on 512 px latents) and 64 rows, 12 heads, P alone is 3.2 GB in fp32.
jvp_flash_attention (MIT, PyPI) computes the same tangent in a Triton flash kernel without P. This script measures,
for each candidate, the error of the tangent against a float64 closed form on the same inputs (fresh random
inputs, q, k, v scaled so the softmax is not flat) and the median time and peak memory of one tangent:

* closed form, the inputs' dtype (what the DiT runs today);
* torch.func.jvp through SDPA on the math backend (MeanFlow's `jvp_impl = "torch"`);
* jvp_flash_attention's kernel (`JVPAttn.forward(q, k, v, dq, dk, dv, ...)`, CUDA only).

    python benchmarks/jvp_flash_attn.py --tokens 256 1024 --batch 64 --heads 12 --dim 64 --dtype bf16 --json out.json

The package is adopted as an attention path of the DiT's JVP only if it is faster at equal error. On a machine
without CUDA or without the package its row says why it was skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from fewstep.bench import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins"))
try:
    from fewstep_plugins.dit.jvp import attention_tangent
except ImportError:  # run from a checkout without the package installed
    from dit.jvp import attention_tangent  # type: ignore[no-redef]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inputs(b, h, n, d, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(6)]
    t[0] *= 2.0  # q: scores of order 2, a peaked softmax
    return [x.to(device) for x in t], [x.to(device=device, dtype=dtype) for x in t]


def timed(fn, device, iters):
    """Median ms of `fn` (fewstep bench's Timer: CUDA events, or perf_counter on the CPU) after one warm-up call,
    and the extra peak memory it allocates (GiB; NaN on the CPU)."""
    timer = Timer(device)
    fn()
    timer.sync()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    ms = statistics.median(timer(fn) for _ in range(iters))
    return ms, (torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else float("nan")


def candidates(scale):
    def closed(q, k, v, dq, dk, dv):
        return attention_tangent(q, k, v, dq, dk, dv, scale)

    def func_jvp(q, k, v, dq, dk, dv):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda a, b_, c: torch.nn.functional.scaled_dot_product_attention(a, b_, c, scale=scale),
                                  (q, k, v), (dq, dk, dv))[1]

    def flash(q, k, v, dq, dk, dv):
        from jvp_flash_attention.jvp_attention import JVPAttn

        with torch.no_grad():
            _, rest = JVPAttn.forward(q.contiguous(), k.contiguous(), v.contiguous(), dq.contiguous(), dk.contiguous(),
                                      dv.contiguous(), None, 0.0, False, scale)
        return rest[0]

    return {"closed form (DiT forward_jvp)": closed, "torch.func.jvp, math SDPA": func_jvp, "jvp_flash_attention": flash}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    scale = args.dim ** -0.5
    rows = []
    for n in args.tokens:
        ref_in, x = inputs(args.batch, args.heads, n, args.dim, dtype, device, seed=n)
        ref = attention_tangent(*ref_in, scale)  # float64
        del ref_in
        for name, fn in candidates(scale).items():
            row = {"tokens": n, "candidate": name, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
                   "dim": args.dim}
            try:
                if name == "jvp_flash_attention" and device.type != "cuda":
                    raise RuntimeError("needs CUDA (a Triton kernel)")
                out = fn(*x)
                row["rel_error"] = float((out.double() - ref).norm() / ref.norm())
                row["ms"], row["peak_gib"] = timed(lambda: fn(*x), device, args.iters)
            except Exception as exc:  # noqa: BLE001 - the reason is the result
                row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{card}; torch {torch.__version__}; B={args.batch} H={args.heads} d={args.dim} {args.dtype}; "
          f"error of the tangent against float64, median of {args.iters}")
    print("| tokens | candidate | rel. error | ms | extra peak GiB |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['tokens']} | {r['candidate']} | skipped: {r['skipped']} | | |")
        else:
            print(f"| {r['tokens']} | {r['candidate']} | {r['rel_error']:.2e} | {r['ms']:.2f} | {r['peak_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
