"""What the parts of a MeanFlow step cost on a GPU: plain forwards by row count, a flow-matching
forward + backward, and the JVP of the DiT by attention path and execution (eager / torch.compile).

    PYTHONPATH=$PWD python3 benchmarks/meanflow_parts.py --size B/2 --rows 64 --precision bf16

Times are medians of CUDA-event timings after warm-up (compiled variants are warmed past their
compilation; the compile time is printed separately). Each JVP variant is checked against an fp32
eager JVP on the same inputs by ||d - d_ref|| / ||d_ref||.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def bench(fn, warmup=3, iters=10):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="B/2")
    ap.add_argument("--rows", type=int, default=64, help="rows in the JVP (the r != t rows of a 256 batch)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile of torch.func.jvp (fails on torch 2.11)")
    args = ap.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import inprocess
    from fewstep.interfaces import BuildContext, DataSpec

    reg = inprocess.registry()
    dev = torch.device("cuda")
    ctx = BuildContext(data=DataSpec((4, 32, 32), 1000), device=dev)
    torch.manual_seed(0)
    spec = reg.get("backbone", "dit")
    net = spec.build(ctx, **spec.options.resolve({"size": args.size})).to(dev)
    # a trained-looking net: adaLN-Zero starts as the identity, which would make every JVP trivial
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    auto = (torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16"
            else contextlib.nullcontext())
    B, R = args.batch, args.rows
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(2 * B, 4, 32, 32, device=dev, generator=g)
    t = torch.rand(2 * B, device=dev, generator=g)
    y = torch.randint(0, 1000, (2 * B,), device=dev, generator=g)
    rows = []

    def add(name, ms, note=""):
        rows.append((name, ms, note))
        print(f"{name:60s} {ms:8.1f} ms  {note}", flush=True)

    net.eval()
    for n in (R, B, int(1.15 * B), int(1.8 * B)):  # 1.15 B: MeanFlow's guidance rows at B (v_u 0.9 B, v_c 0.25 x 0.9 B)
        def fwd(n=n):
            with torch.no_grad(), auto:
                net(x[:n], t[:n], t[:n], y[:n])
        add(f"forward, no grad, eval, {n} rows", bench(fwd))
    net.train()

    def fwd_bwd():
        with auto:
            out = net(x[:B], t[:B], t[:B], y[:B])
        out.float().pow(2).mean().backward()
        net.zero_grad(set_to_none=True)
    add(f"forward + backward, {B} rows (FM step without optimizer)", bench(fwd_bwd))

    z, tt, rr, yy = x[:R], t[:R], t[:R] * 0.5, y[:R]
    v = torch.randn_like(z)

    def jvp_fn(z_, t_, r_, v_):
        return torch.func.jvp(lambda a, b, c: net(a, b, c, yy), (z_, t_, r_), (v_, torch.ones_like(t_), torch.zeros_like(r_)))

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref = jvp_fn(z, tt, rr, v)[1].float()  # fp32 reference (no autocast)

    def err(d):
        return f"rel err {float((d.float() - ref).norm() / ref.norm()):.2e}"

    def run_eager_math():
        with torch.no_grad(), auto, sdpa_kernel(SDPBackend.MATH):
            return jvp_fn(z, tt, rr, v)[1]
    add(f"JVP eager, SDPA math backend, {R} rows", bench(run_eager_math), err(run_eager_math()))

    net.set_attention("math")

    def run_eager_explicit():
        with torch.no_grad(), auto:
            return jvp_fn(z, tt, rr, v)[1]
    add(f"JVP eager, explicit softmax (timm fused_attn off), {R} rows", bench(run_eager_explicit), err(run_eager_explicit()))

    net.set_attention("fused")

    def run_hand():
        with torch.no_grad(), auto:
            return net.forward_jvp(z, tt, rr, yy, v, torch.ones_like(tt), torch.zeros_like(rr))[1]
    add(f"JVP hand-written DiT.forward_jvp (fused SDPA primal), {R} rows", bench(run_hand), err(run_hand()))

    from fewstep_plugins.meanflow.jvp import backbone_jvp

    cfn = backbone_jvp(net, "on", dev)

    def run_hand_compiled():
        with torch.no_grad(), auto:
            return cfn(z, tt, rr, yy, v, torch.ones_like(tt), torch.zeros_like(rr))[1]
    t0 = time.perf_counter()
    first = run_hand_compiled()
    torch.cuda.synchronize()
    comp = time.perf_counter() - t0
    add(f"JVP hand-written, torch.compile'd, {R} rows", bench(run_hand_compiled), f"{err(first)}; compile {comp:.0f} s")

    net.eval()
    for n in (B, int(1.15 * B)):
        def fwd_after(n=n):
            with torch.no_grad(), auto:
                net(x[:n], t[:n], t[:n], y[:n])
        add(f"forward, no grad, eval, {n} rows, after the compiled JVP", bench(fwd_after),
            f"alloc retries {torch.cuda.memory_stats()['num_alloc_retries']}")
    net.train()

    def run_hand_all():
        with torch.no_grad(), auto:
            return net.forward_jvp(x[:B], t[:B], t[:B] * 0.5, y[:B], x[B:2 * B], torch.ones_like(t[:B]), torch.zeros_like(t[:B]))[1]
    add(f"JVP hand-written DiT.forward_jvp, {B} rows", bench(run_hand_all))

    def single_hand():
        with auto:
            u, d = net.forward_jvp(x[:B], t[:B], t[:B] * 0.5, y[:B], x[B:2 * B], torch.ones_like(t[:B]), torch.zeros_like(t[:B]))
        (u.float() - d.float()).pow(2).mean().backward()
        net.zero_grad(set_to_none=True)
    add(f"u with grad + du/dt by forward_jvp, then backward, {B} rows", bench(single_hand))
    net.set_attention("math")

    if args.compile:
        for mode in ("default", "max-autotune-no-cudagraphs"):
            torch._dynamo.reset()
            cj = torch.compile(jvp_fn, mode=None if mode == "default" else mode)

            def run_compiled(cj=cj):
                with torch.no_grad(), auto:
                    return cj(z, tt, rr, v)[1]
            t0 = time.perf_counter()
            try:
                out = run_compiled()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - the failure is the measurement
                add(f"JVP torch.compile({mode}), explicit softmax", float("nan"), f"FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            comp = time.perf_counter() - t0
            add(f"JVP torch.compile({mode}), explicit softmax, {R} rows", bench(run_compiled), f"{err(out)}; compile {comp:.0f} s")
    net.set_attention("fused")
    print()
    print(f"card: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; DiT-{args.size}; {args.precision}")
    print("| part | median ms | note |\n|---|---:|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.1f} | {note} |")


if __name__ == "__main__":
    main()
