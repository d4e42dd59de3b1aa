"""Where a MeanFlow lean step spends its time (CUDA events around each part), DiT-B/2, batch 256, bf16."""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import step_time
from fewstep.interfaces import Batch, BuildContext, DataSpec
reg = step_time.registry()
from fewstep_plugins.meanflow import jvp as J  # noqa: E402 (after the registry maps the plugins/ folder)
dev = torch.device("cuda")
ctx = BuildContext(data=DataSpec((4, 32, 32), 1000), device=dev)
torch.manual_seed(0)
net = reg.get("backbone", "dit").build(ctx, **reg.get("backbone", "dit").options.resolve({"size": "B/2"})).to(dev)
obj = reg.get("objective", "meanflow").build(ctx, **reg.get("objective", "meanflow").options.resolve({}))
B = 256
x = torch.randn(B, 4, 32, 32, device=dev); y = torch.randint(0, 1000, (B,), device=dev)
timings = {}
def timed(name, fn):
    def wrap(*a, **k):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); out = fn(*a, **k); e.record(); torch.cuda.synchronize()
        timings.setdefault(name, []).append(s.elapsed_time(e)); return out
    return wrap
obj.guided_velocity = timed("guidance (no-grad, 2 forwards)", obj.guided_velocity)
J._jvp = timed("jvp (no-grad, r != t rows)", J._jvp)
for i in range(8):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); out = obj.loss(net, Batch(x, y), i); e.record(); torch.cuda.synchronize()
        timings.setdefault("whole loss() forward part", []).append(s.elapsed_time(e))
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); out.loss.backward(); e.record(); torch.cuda.synchronize()
    timings.setdefault("backward", []).append(s.elapsed_time(e))
    net.zero_grad(set_to_none=True)
for k, v in timings.items():
    v = sorted(v[3:]); print(f"{k:40s} median {v[len(v)//2]:7.1f} ms")
