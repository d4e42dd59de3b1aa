"""Is a hand-written U-Net JVP worth writing? Times a MeanFlow step (torch.func.jvp through the U-Net)
against a flow-matching step on the same `unet` backbone, batch and precision.

The backbone is the CIFAR-10 U-Net of py-meanflow / SoFlow (128 channels, [2, 2, 2], 4 blocks, attention
at 16, channel_mult_noise 2, resample [1, 3, 3, 1], augment_dim 6, --dropout) on 3x32x32 images,
unconditional. Every objective runs with its registered defaults plus the `name:key=value` overrides
given (the defaults below are py-meanflow's and SoFlow's CIFAR values). Besides the training steps it
times the network alone: a no-grad forward, a no-grad torch.func.jvp along (v, 1, 0) (what MeanFlow's
lean mode adds to a step) and a forward + backward. CUDA-event medians over --steps after --warmup.

    python benchmarks/unet_jvp.py --batch 128 --precision bf16 [--channels-last] [--compile] [--out DIR]

A hand-written JVP (like the DiT's forward_jvp) can at best bring the MeanFlow step down to about
FM step + one no-grad forward-with-tangent (~2-3 forwards); the `jvp / forward` row says how far
torch.func.jvp is from that. Works without installing fewstep (plugins registered in-process).
--device cpu --tiny runs a seconds-long smoke test of the script itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["fm", "meanflow:jvp_mode=lean:fm_share=0.25:p=0.75:eps=0.001",
              "meanflow:jvp_mode=single:fm_share=0.25:p=0.75:eps=0.001",
              "soflow:p=0.75:eps=0.001:cfg_scale=1:cfg_drop=0:mix_ratio=1"]


def registry():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inprocess import registry as plugins_in_process

    return plugins_in_process(("unet", "fm", "soflow", "meanflow"))


def parse_objective(text: str):
    from fewstep.recipe import parse_override

    name, *pairs = text.split(":")
    return name, {k: parse_override(f"x.{k}={v}")[2] for k, _, v in (p.partition("=") for p in pairs)}


def timed(fn, steps: int, warmup: int, device) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="bf16")
    ap.add_argument("--dropout", type=float, default=0.2, help="backbone dropout (py-meanflow 0.2, SoFlow 0.3)")
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true", help="backbone option channels_last = true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone (as train.compile does)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small U-Net (smoke test of this script)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fewstep.interfaces import Batch, BuildContext, DataSpec

    dev = torch.device(args.device)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "no CUDA device (use --device cpu --tiny for a smoke test)"
    if args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reg = registry()
    ctx = BuildContext(data=DataSpec((3, 32, 32), 0, "cifar10-shaped"), train_steps=800_000, device=dev)
    backbone = dict(channel_mult_noise=2, resample_filter=[1, 3, 3, 1], augment_dim=6, dropout=args.dropout,
                    channels_last=args.channels_last)
    if args.tiny:
        backbone.update(model_channels=32, num_blocks=1)
    bspec = reg.get("backbone", "unet")
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [Batch(torch.randn(args.batch, 3, 32, 32, device=dev, generator=g), None) for _ in range(4)]
    auto = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16"
            else torch.autocast(dev.type, enabled=False))
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"

    def fresh():
        torch.manual_seed(0)
        return bspec.create(ctx, **backbone).to(dev)

    rows = []

    def record(what, times, extra=None):
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        rows.append({"what": what, "ms": statistics.median(times), "spread": max(times) - min(times), "peak_gib": peak,
                     **(extra or {})})
        print(json.dumps(rows[-1]), flush=True)

    # --- the network alone
    net = fresh()
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    model = torch.compile(net) if args.compile else net
    x, t = batches[0].x, torch.rand(args.batch, device=dev)
    r = t * torch.rand(args.batch, device=dev)
    v = torch.randn_like(x)

    def forward():
        with torch.no_grad(), auto:
            model(x, t, r, None)

    def jvp():  # what MeanFlow's lean mode adds: no grad, math attention, the eager module
        with torch.no_grad(), auto, sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(lambda a, b, c: net(a, b, c, None), (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))

    def fwd_bwd():
        with auto:
            out = model(x, t, r, None)
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    for what, fn in (("forward (no grad)", forward), ("torch.func.jvp (no grad, math attention)", jvp),
                     ("forward + backward", fwd_bwd)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        record(what, timed(fn, args.steps, args.warmup, dev))
    del net, model

    # --- training steps per objective
    for text in args.objectives:
        name, overrides = parse_objective(text)
        net = fresh()
        ospec = reg.get("objective", name)
        obj = ospec.build(ctx, **ospec.options.resolve(overrides))
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=dev.type == "cuda")
        model = torch.compile(net) if args.compile else net
        state = {"i": 0}

        def step():
            with auto:
                out = obj.loss(model, batches[state["i"] % len(batches)], state["i"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["i"] += 1
            state["loss"] = out.loss

        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            times = timed(step, args.steps, args.warmup, dev)
        except torch.cuda.OutOfMemoryError:
            rows.append({"what": f"step: {text}", "ms": float("nan"), "oom": True})
            print(json.dumps(rows[-1]), flush=True)
        else:
            record(f"step: {text}", times, {"loss_finite": bool(torch.isfinite(state["loss"]).item())})
        del net, obj, opt, model
        if args.compile:
            torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    by = {row["what"]: row for row in rows}
    fm = by.get("step: fm", {}).get("ms")
    fwd = by["forward (no grad)"]["ms"]
    flags = ", channels_last" * args.channels_last + ", backbone torch.compile'd" * args.compile
    lines = [f"card: {card}; torch {torch.__version__}; unet {params_m:.2f}M params (SoFlow/py-meanflow CIFAR config"
             f"{', tiny' if args.tiny else ''}), dropout {args.dropout}, batch {args.batch}, {args.precision}{flags}; "
             f"median of {args.steps} after {args.warmup} warm-up", "",
             "| what | ms | x forward | x FM step | peak GiB |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        if row.get("oom"):
            lines.append(f"| {row['what']} | out of memory | | | |")
            continue
        xfm = f"{row['ms'] / fm:.2f}" if fm and row["what"].startswith("step") else ""
        lines.append(f"| {row['what']} | {row['ms']:.1f} | {row['ms'] / fwd:.2f} | {xfm} | {row['peak_gib']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "unet_jvp.md").write_text(text + "\n")
        (args.out / "unet_jvp.json").write_text(json.dumps({"card": card, "torch": torch.__version__, "params_m": params_m,
                                                            "args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                                           indent=2))


if __name__ == "__main__":
    main()
