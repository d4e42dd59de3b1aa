"""Where the CPU time of a quickstart training step goes: torch.profiler over full `fewstep train` steps
(loss, backward, AdamW, EMA) of recipes/quickstart.toml (SoFlow) and recipes/quickstart_fm.toml (FM),
same batch, on the CPU with a fixed number of threads.

    PYTHONPATH=$PWD python benchmarks/cpu_step.py                 # 2 threads, the quickstart's batch (48)
    PYTHONPATH=$PWD python benchmarks/cpu_step.py --threads 1 --batch 128

Prints three markdown tables:
1. milliseconds per step over --steps timed steps after --warmup untimed ones: the median, and the
   fastest step (on cores shared with other jobs the fastest step is the best estimate of an idle machine);
2. the step split by part: each network call is tagged by what it is for (SoFlow: the no-grad guidance
   forward v_u/v_c, the student forward with grad, the no-grad teacher forward at (x_l, l, s); FM: its one
   forward), then backward, optimizer and EMA (torch.profiler, wall time of each tagged region);
3. the DiT's per-call overhead: one no-grad forward at several row counts; a straight-line fit
   ms = a + b * rows gives the fixed cost a of one call (Python, module dispatch, ~100 small ops) and
   the cost per row b (each point: the fastest of 30 calls).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "fewstep_plugins" not in sys.modules:  # the plugins/ folder of this tree is the fewstep_plugins package
    pkg = types.ModuleType("fewstep_plugins")
    pkg.__path__ = [str(ROOT / "plugins")]
    sys.modules["fewstep_plugins"] = pkg

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from fewstep.build import build_components  # noqa: E402
from fewstep.engine.ema import ema_from_train  # noqa: E402
from fewstep.engine.trainer import make_optimizer  # noqa: E402
from fewstep.interfaces import Batch  # noqa: E402
from fewstep.recipe import load_recipe  # noqa: E402
from fewstep.registry import Registry  # noqa: E402


def registry() -> Registry:
    reg = Registry(load_entrypoints=False)
    for name in ("dit", "fm", "soflow", "digits", "loggers"):
        reg.register_plugin(importlib.import_module(f"fewstep_plugins.{name}"), name=name, package="fewstep")
    return reg


class Tagged(torch.nn.Module):
    """The backbone, with each call wrapped in a profiler region named after its role in the loss.

    Calls are told apart by order and grad mode: SoFlow calls the network without grad (guidance), with grad
    (student), without grad (teacher); FM calls it once with grad."""

    def __init__(self, net, no_grad_names: tuple[str, ...]):
        super().__init__()
        self.net, self.no_grad_names, self.k = net, no_grad_names, 0

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            name = "student forward (grad)"
        else:
            name = self.no_grad_names[min(self.k, len(self.no_grad_names) - 1)]
            self.k += 1
        with record_function(name):
            return self.net(*args, **kwargs)


def setup(recipe_path: Path, batch: int, reg: Registry):
    r = load_recipe(recipe_path, [f"train.batch={batch}", "train.device=cpu"], registry=reg)
    comps = build_components(r, device=torch.device("cpu"), registry=reg)
    net = comps.net
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], r.train, torch.device("cpu"))
    ema = ema_from_train(net, r.train)
    batches = comps.data.batches(batch, seed=0)
    names = ("guidance forward v_u, v_c (no grad)", "teacher forward f(x_l, l, s) (no grad)")
    return r, net, Tagged(net, names), comps.objective, opt, ema, batches


def step(net, tagged, objective, opt, ema, batches, k: int) -> None:
    b = next(batches)
    tagged.k = 0
    with record_function("loss (objective, all forwards)"):
        out = objective.loss(tagged, Batch(b.x, b.y), k)
    with record_function("backward"):
        out.loss.backward()
    with record_function("optimizer (grad-norm, AdamW)"):
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
    with record_function("EMA update"):
        ema.update(net, k + 1)


def step_ms(args, recipe_path: Path, reg: Registry) -> tuple[float, dict[str, float], object]:
    torch.manual_seed(0)
    r, net, tagged, objective, opt, ema, batches = setup(recipe_path, args.batch, reg)
    for k in range(args.warmup):
        step(net, tagged, objective, opt, ema, batches, k)
    times = []
    for k in range(args.steps):
        t0 = time.perf_counter()
        step(net, tagged, objective, opt, ema, batches, args.warmup + k)
        times.append(1e3 * (time.perf_counter() - t0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(args.profile_steps):
            step(net, tagged, objective, opt, ema, batches, args.warmup + args.steps + k)
    regions: dict[str, float] = {}
    cats: dict[str, float] = {}
    calls = 0
    for e in prof.key_averages():
        if e.key in REGIONS:  # user regions: their wall time, children included
            regions[e.key] = e.cpu_time_total / 1e3 / args.profile_steps
        elif e.key.startswith("aten::"):  # self time: each op counted once, without its children
            cats[category(e.key)] = cats.get(category(e.key), 0.0) + e.self_cpu_time_total / 1e3 / args.profile_steps
            calls += e.count
    cats["(aten calls per step)"] = calls / args.profile_steps
    return (statistics.median(times), min(times)), regions, cats, net


CATEGORIES = (  # (category, substrings of the aten op name); the first category that matches wins
    ("random draws", ("rand", "normal_", "uniform", "bernoulli")),
    ("matmul (linear, bmm, patch conv)", ("addmm", "bmm", "mm", "matmul", "linear", "conv")),
    ("attention (SDPA, softmax)", ("attention", "softmax")),
    ("layer norm", ("layer_norm",)),
    ("optimizer (foreach, AdamW)", ("_foreach", "adam", "norm")),
    ("elementwise and activations", ("add", "mul", "sub", "div", "gelu", "silu", "tanh", "exp", "sin", "cos", "pow",
                                     "where", "sign", "sigmoid", "clamp", "minimum", "maximum", "neg", "sqrt", "fill",
                                     "zero", "mean", "sum", "lerp", "abs", "lt", "gt", "eq", "ne", "log")),
    ("copies and layout (cat, copy, views)", ("cat", "copy", "clone", "contiguous", "view", "reshape", "permute",
                                              "transpose", "expand", "chunk", "split", "slice", "select", "squeeze",
                                              "stack", "einsum", "flatten", "empty", "to", "index", "strided", "unbind",
                                              "detach", "alias", "embedding", "t")),
)


def category(op: str) -> str:
    name = op.split("::", 1)[1]
    for cat, keys in CATEGORIES:
        if any((k in name) if len(k) > 2 else name.strip("_") == k or name.startswith(k + "_") for k in keys):
            return cat
    return "other aten ops"


TOP = ("loss (objective, all forwards)", "backward", "optimizer (grad-norm, AdamW)", "EMA update")  # the whole step
REGIONS = ("loss (objective, all forwards)", "guidance forward v_u, v_c (no grad)", "student forward (grad)",
           "teacher forward f(x_l, l, s) (no grad)", "backward", "optimizer (grad-norm, AdamW)", "EMA update")


def per_call(net, rows_list, reps: int) -> list[tuple[int, float]]:
    net = copy.deepcopy(net).eval()
    out = []
    for n in rows_list:
        x = torch.randn(n, 1, 8, 8)
        t = torch.rand(n)
        y = torch.randint(0, 10, (n,))
        with torch.no_grad():
            for _ in range(5):
                net(x, t, t * 0.5, y)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                net(x, t, t * 0.5, y)
                ts.append(1e3 * (time.perf_counter() - t0))
        out.append((n, min(ts)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile-steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reg = registry()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup}; parts: torch.profiler over {args.profile_steps} steps\n")
    rows, parts, ops = [], {}, {}
    net = None
    for label, path in (("SoFlow (quickstart.toml)", ROOT / "recipes" / "quickstart.toml"),
                        ("FM (quickstart_fm.toml)", ROOT / "recipes" / "quickstart_fm.toml")):
        ms, regions, cats, net = step_ms(args, path, reg)
        rows.append((label, ms))
        parts[label] = regions
        ops[label] = cats
    print("| objective | median ms / step | fastest step ms | 1500 fastest steps |\n|---|---:|---:|---:|")
    for label, (med, best) in rows:
        print(f"| {label} | {med:.1f} | {best:.1f} | {1.5 * best:.0f} s |")
    print("\n| part of the step | " + " | ".join(f"{label} ms" for label, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name in REGIONS:
        cells = [f"{parts[label][name]:.1f}" if name in parts[label] else "-" for label, _ in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| op category (aten self time) | " + " | ".join(f"{label} ms" for label, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    names = [c for c, _ in CATEGORIES] + ["other aten ops"]
    for name in names:
        print(f"| {name} | " + " | ".join(f"{ops[label].get(name, 0.0):.1f}" for label, _ in rows) + " |")
    tot = {label: sum(v for k, v in ops[label].items() if not k.startswith("(")) for label, _ in rows}
    print("| all aten ops | " + " | ".join(f"{tot[label]:.1f}" for label, _ in rows) + " |")
    print("| step wall time minus aten ops (Python, autograd engine, dispatch) | "
          + " | ".join(f"{sum(parts[label].get(k, 0.0) for k in TOP) - tot[label]:.1f}" for label, _ in rows) + " |")
    print("| aten op calls per step | " + " | ".join(f"{ops[label]['(aten calls per step)']:.0f}" for label, _ in rows)
          + " |")
    sizes = [1, 12, 36, 48, 96]
    pc = per_call(net, sizes, reps=30)
    n = len(pc)
    mx = sum(r for r, _ in pc) / n
    my = sum(m for _, m in pc) / n
    b = sum((r - mx) * (m - my) for r, m in pc) / sum((r - mx) ** 2 for r, _ in pc)
    a = my - b * mx
    print("\n| rows in one no-grad DiT-T/2 forward | ms |\n|---:|---:|")
    for r_, m in pc:
        print(f"| {r_} | {m:.2f} |")
    print(f"\nfit: ms = {a:.2f} + {b:.3f} * rows (the fixed cost of one call: {a:.2f} ms)")


if __name__ == "__main__":
    main()
