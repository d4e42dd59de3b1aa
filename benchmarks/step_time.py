"""Training-step time and peak memory of each objective on the same DiT, batch and precision.

Everything but the objective is fixed: the backbone (DiT of --size on 4x32x32 latents, 1000
classes, the ImageNet-256 latent shape), the batch, fused AdamW, the precision. Each objective runs
with its registered defaults (the official ImageNet values) plus any `name:key=value` overrides.
Times are CUDA-event medians over --steps steps after --warmup steps; peak memory is
torch.cuda.max_memory_allocated over the timed steps.

    python benchmarks/step_time.py --size B/2 --batch 256 --precision bf16 \\
        --objectives fm soflow meanflow:jvp_mode=lean meanflow:jvp_mode=single ect

It also reports whether forward-mode AD runs through torch's fused attention on this device.
Works without installing fewstep (the built-in plugins are registered in-process).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def registry():
    import importlib
    import types

    sys.path.insert(0, str(ROOT))
    if "fewstep_plugins" not in sys.modules:  # the plugins/ folder is the fewstep_plugins package
        pkg = types.ModuleType("fewstep_plugins")
        pkg.__path__ = [str(ROOT / "plugins")]
        sys.modules["fewstep_plugins"] = pkg
    from fewstep.registry import Registry

    reg = Registry(load_entrypoints=False)
    for name in ("dit", "fm", "soflow", "meanflow", "ect"):
        reg.register_plugin(importlib.import_module(f"fewstep_plugins.{name}"), name=name, package="fewstep")
    return reg


def parse_objective(text: str):
    name, *pairs = text.split(":")
    opts = {}
    for pair in pairs:
        k, _, v = pair.partition("=")
        from fewstep.recipe import parse_override

        opts[k] = parse_override(f"x.{k}={v}")[2]
    return name, opts


def fused_attention_supports_jvp(net, x, t, y) -> str:
    import torch

    net.set_attention("fused")
    try:
        torch.func.jvp(lambda z: net(z, t, t, y), (x,), (torch.randn_like(x),))
        return "yes"
    except Exception as exc:  # noqa: BLE001 - the message is the measurement
        return f"no ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="B/2")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="bf16")
    ap.add_argument("--objectives", nargs="+", default=["fm", "soflow", "meanflow:jvp_mode=lean",
                                                        "meanflow:jvp_mode=single", "ect"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone for every objective "
                    "(as the recipe option train.compile does)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from fewstep.interfaces import Batch, BuildContext, DataSpec

    assert torch.cuda.is_available(), "this benchmark measures a CUDA device"
    dev = torch.device("cuda")
    if args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reg = registry()
    spec = DataSpec((4, 32, 32), 1000, "imagenet256-latents")
    ctx = BuildContext(data=spec, train_steps=400_000, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [Batch(torch.randn(args.batch, 4, 32, 32, device=dev, generator=g),
                     torch.randint(0, 1000, (args.batch,), device=dev, generator=g)) for _ in range(4)]
    card = torch.cuda.get_device_name(dev)
    rows = []
    jvp_fused = None
    for text in args.objectives:
        name, overrides = parse_objective(text)
        torch.manual_seed(0)
        bspec = reg.get("backbone", "dit")
        net = bspec.build(ctx, **bspec.options.resolve({"size": args.size})).to(dev)
        if jvp_fused is None:
            b = batches[0]
            jvp_fused = fused_attention_supports_jvp(net, b.x[:8], torch.rand(8, device=dev), b.y[:8])
            net.set_attention("fused")
        ospec = reg.get("objective", name)
        obj = ospec.build(ctx, **ospec.options.resolve(overrides))
        if hasattr(obj, "prepare"):
            obj.prepare(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.99), fused=True)
        model = torch.compile(net) if args.compile else net
        auto = torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16" else torch.autocast("cuda", enabled=False)

        def step(i):
            with auto:
                out = obj.loss(model, batches[i % len(batches)], i)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out

        times = []
        try:
            for i in range(args.warmup):
                step(i)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            for i in range(args.steps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = step(args.warmup + i)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
        except torch.cuda.OutOfMemoryError:
            rows.append({"objective": text, "ms_per_step": float("nan"), "ms_spread": float("nan"),
                         "peak_gib": float("nan"), "loss_finite": False, "oom": True, "params_m": float("nan")})
            print(json.dumps(rows[-1]), flush=True)
            del net, obj, opt, model
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            continue
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        loss = float(out.loss)
        rows.append({"objective": text, "ms_per_step": statistics.median(times), "ms_spread": max(times) - min(times),
                     "peak_gib": peak, "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
                     "params_m": sum(p.numel() for p in net.parameters()) / 1e6})
        print(json.dumps(rows[-1]), flush=True)
        del net, obj, opt, model
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    base = next((r for r in rows if r["objective"] == "fm"), rows[0])
    total_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30
    compiled = ", backbone torch.compile'd" if args.compile else ""
    lines = [f"card: {card}; torch {torch.__version__}; DiT-{args.size}, batch {args.batch}, {args.precision}{compiled}; "
             f"median of {args.steps} steps after {args.warmup} warm-up",
             f"forward-mode AD through fused SDPA on this device: {jvp_fused}", "",
             "| objective | ms/step | x FM | peak GiB | x FM |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['objective']} | out of memory ({total_gib:.0f} GiB card) | | | |")
            continue
        lines.append(f"| {r['objective']} | {r['ms_per_step']:.1f} | {r['ms_per_step'] / base['ms_per_step']:.2f} | "
                     f"{r['peak_gib']:.1f} | {r['peak_gib'] / base['peak_gib']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_time.md").write_text(text + "\n")
        (args.out / "step_time.json").write_text(json.dumps({"card": card, "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)},
                                                             "jvp_through_fused_sdpa": jvp_fused, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
