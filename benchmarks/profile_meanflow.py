"""Where a MeanFlow step spends its time (CUDA events around each part, synchronising after each), DiT-B/2,
batch 256, bf16. Each argument is one configuration of `name:key=value` overrides of the meanflow options.

    PYTHONPATH=$PWD python3 benchmarks/profile_meanflow.py "" jvp_compile=off jvp_impl=torch
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import inprocess  # noqa: E402
from fewstep.interfaces import Batch, BuildContext, DataSpec  # noqa: E402

reg = inprocess.registry()
from fewstep_plugins.meanflow import jvp as J  # noqa: E402 (after the registry maps the plugins/ folder)
from fewstep_plugins.meanflow import objective as O  # noqa: E402

dev = torch.device("cuda")
ctx = BuildContext(data=DataSpec((4, 32, 32), 1000), device=dev)
B = 256
x = torch.randn(B, 4, 32, 32, device=dev)
y = torch.randint(0, 1000, (B,), device=dev)
timings: dict = {}


def timed(name, fn):
    def wrap(*a, **k):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        out = fn(*a, **k)
        e.record()
        torch.cuda.synchronize()
        timings.setdefault(name, []).append(s.elapsed_time(e))
        return out
    return wrap


orig_bjvp = J.backbone_jvp
J.backbone_jvp = lambda *a: timed("  backbone forward_jvp on the r != t rows", orig_bjvp(*a))
J._jvp = timed("  torch.func.jvp on the r != t rows", J._jvp)
O.u_and_dudt = timed("u_and_dudt (JVP + u forward)", O.u_and_dudt)
table = []
for config in [a for a in sys.argv[1:] if a != "--trace"] or [""]:
    overrides = inprocess.parse_objective("meanflow" + (":" + config.replace(",", ":") if config else ""))[1]
    torch.manual_seed(0)
    net = reg.get("backbone", "dit").build(ctx, **reg.get("backbone", "dit").options.resolve({"size": "B/2"})).to(dev)
    obj = reg.get("objective", "meanflow").build(ctx, **reg.get("objective", "meanflow").options.resolve(overrides))
    obj._guidance = timed("guidance forward (v_u, v_c), no grad", obj._guidance)
    timings.clear()
    def plain_forward(n=294):
        net.eval()
        with torch.no_grad():
            net(x[:n], x.new_full((n,), 0.5), x.new_full((n,), 0.5), y[:n])
        net.train()

    for i in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            timed("reference: a plain no-grad eval forward of 256 rows", plain_forward)(256)
        if i == 6 and "--trace" in sys.argv:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    obj._guidance(net, x, x, torch.rand(B, device=dev), y, None, None)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = timed("whole loss()", obj.loss)(net, Batch(x, y), i)
        timed("backward", out.loss.backward)()
        net.zero_grad(set_to_none=True)
    for k, v in timings.items():
        table.append((config or "(defaults)", k, statistics.median(v[3:])))
    del net, obj
print("| configuration | part | median ms |\n|---|---|---:|")
for c, k, ms in table:
    print(f"| {c} | {k} | {ms:.1f} |")
