"""What a new row count costs an eager DiT-B/2 forward (CPU launch time and wall time), before and after a
torch.compile'd forward_jvp has run. Why `fewstep bench` warms up for 30 steps (docs/benchmarks.md).

    PYTHONPATH=$PWD python3 benchmarks/probe_shapes.py
"""
import statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import inprocess
from fewstep.interfaces import BuildContext, DataSpec
reg = inprocess.registry()
from fewstep_plugins.meanflow.jvp import backbone_jvp
dev = torch.device("cuda")
ctx = BuildContext(data=DataSpec((4, 32, 32), 1000), device=dev)
torch.manual_seed(0)
net = reg.get("backbone", "dit").build(ctx, **reg.get("backbone", "dit").options.resolve({"size": "B/2"})).to(dev).eval()
x = torch.randn(320, 4, 32, 32, device=dev); t = torch.rand(320, device=dev); y = torch.randint(0, 1000, (320,), device=dev)
def fwd(n):
    torch.cuda.synchronize(); c0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        net(x[:n], t[:n], t[:n], y[:n])
    c1 = time.perf_counter(); torch.cuda.synchronize(); c2 = time.perf_counter()
    return (c1 - c0) * 1e3, (c2 - c0) * 1e3
def report(name, ns, between=None):
    cpu, wall = [], []
    for n in ns:
        if between: between()
        a, b = fwd(n); cpu.append(a); wall.append(b)
    print(f"{name:70s} cpu-launch median {statistics.median(cpu):6.1f} ms, wall median {statistics.median(wall):6.1f} ms", flush=True)
cycle = [290 + (i % 10) for i in range(30)]
report("eager fwd, rows cycling 290..299, before compile (first sight)", cycle[:10])
report("eager fwd, rows cycling 290..299, before compile (seen)", cycle[10:])
cj = backbone_jvp(net, "on", dev)
z = x[:64]; tt = t[:64]
def jvp():
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cj(z, tt, tt * 0.5, y[:64], z, torch.ones_like(tt), torch.zeros_like(tt))
jvp(); torch.cuda.synchronize()
report("eager fwd, rows cycling 290..299, after compile (seen)", cycle)
report("eager fwd, new rows 300..319, after compile (first sight)", list(range(300, 320)))
report("eager fwd, rows cycling, compiled JVP called before each", cycle, jvp)
report("eager fwd, fixed 256 rows, compiled JVP called before each", [256] * 20, jvp)
report("eager fwd, fixed 296 rows, compiled JVP called before each", [296] * 20, jvp)
