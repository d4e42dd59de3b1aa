"""`fewstep bench`: what a training step and a sampling pass cost, per objective, on one backbone and batch.

Everything but the objective is fixed by the recipe: data shape, backbone, optimizer, precision, compile.
For each objective (the recipe's objective table swapped, the others at their registered defaults, as
`fewstep compare` does) the bare step is

    loss = objective.loss(model, random batch, step); loss.backward(); opt.step(); opt.zero_grad()

timed step by step with the steps launched back to back, as the training loop launches them (on a GPU the
intervals between CUDA events recorded after each step, one synchronise at the end; perf_counter after a
synchronise on the CPU), the warm-up steps excluded, median reported. (Until 2026-12-07 each step was
synchronised before the next; that charged small models the host's launch time once per step.) Beside it:

* model FLOPs of one step, counted by torch.utils.flop_counter.FlopCounterMode on an eager pass (torch.compile
  switched off while counting, so every matmul, convolution and attention call that the objective really runs
  is seen: forwards, JVP tangents, backward). Matrix and attention FLOPs only; element-wise work is not counted;
* achieved TFLOP/s = FLOPs / time, and its share of the matrix rate measured in the same process by a large
  matmul (bf16 on CUDA, float32 on the CPU);
* the full `fewstep train` step: the same recipe trained by the real Trainer (real data source, EMA, loggers,
  the finite check), its ms per step from metrics.jsonl over a window after the same warm-up.
* for a backbone that can switch its attention (the DiT), a note saying whether forward-mode AD
  (`torch.func.jvp`) runs through torch's fused SDPA on this device (what JVP objectives may use).

`--sampling` times 1- and 2-NFE generation (noise -> sampler -> data.to_images, so latent recipes include the
VAE decode) and the FID feature extractor (the `fid` evaluator's end-to-end feature pass).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError
from .interfaces import ImageStream
from .recipe import Recipe, parse_override, recipe_from_dict


class BenchError(UserError):
    """A bench request that cannot run (bad --objectives, a recipe whose data cannot be built, ...)."""


@dataclass
class StepRow:
    objective: str  # as given: name[:key=value...]
    ms: float = float("nan")  # median ms per bare step
    ms_min: float = float("nan")
    ms_max: float = float("nan")
    images_per_s: float = float("nan")
    peak_gib: float = float("nan")  # max allocated over the timed steps (CUDA only)
    gflop_per_step: float = float("nan")  # model FLOPs of one step (fwd + JVP + bwd), 1e9
    tflops: float = float("nan")  # achieved, gflop / ms
    share_of_matmul: float = float("nan")  # tflops / the measured matmul rate
    x_fm_time: float = float("nan")
    x_fm_memory: float = float("nan")
    train_ms: float = float("nan")  # the `fewstep train` step (real data, EMA, logging)
    train_over_bare: float = float("nan")
    loss_finite: bool = True
    error: str = ""
    profile: dict = field(default_factory=dict)  # --profile: where a step's time goes (profile_breakdown)


@dataclass
class SamplingRow:
    what: str  # "objective nfe=N" or "fid features"
    images_per_s: float = float("nan")
    ms_per_batch: float = float("nan")
    batch: int = 0
    note: str = ""


@dataclass
class BenchReport:
    card: str
    device: str
    torch: str
    commit: str
    command: str
    recipe: str
    backbone: str
    data_shape: list[int]
    batch: int
    precision: str
    compile: bool
    steps: int
    warmup: int
    matmul_tflops: float
    matmul_dtype: str
    rows: list[StepRow] = field(default_factory=list)
    sampling: list[SamplingRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))


# -- parsing --------------------------------------------------------------------------------------------------
def parse_objectives(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """'fm,soflow,meanflow:jvp_mode=single' -> [(label, name, overrides), ...]."""
    out = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, *pairs = item.split(":")
        opts: dict[str, Any] = {}
        for pair in pairs:
            if "=" not in pair:
                raise BenchError(f"--objectives: {item!r}: write options as name:key=value (got {pair!r})")
            k, _, v = pair.partition("=")
            try:
                opts[k] = parse_override(f"objective.{k}={v}")[2]
            except Exception as exc:  # noqa: BLE001 - a RecipeError naming the value
                raise BenchError(f"--objectives: {item!r}: {exc}") from None
        out.append((item, name, opts))
    if not out:
        raise BenchError("--objectives: name at least one objective, e.g. fm,soflow,meanflow,ect")
    return out


def objective_variant(base: Recipe, name: str, overrides: dict[str, Any], *, batch: int | None, compile: bool | None,
                      registry: Any = None) -> Recipe:
    """`base` with the objective swapped (its other keys at their defaults, the sampler its default)."""
    d = copy.deepcopy(base.to_dict())
    d["name"] = f"{base.name}-bench-{name}"
    if name != base.objective.name or overrides:
        keep = base.objective.options if name == base.objective.name else {}
        d["objective"] = {"name": name, **{k: v for k, v in keep.items() if v is not None}, **overrides}
        if name != base.objective.name:
            d.pop("sampler", None)
    if batch:
        d["train"]["batch"] = batch
    if compile is not None:
        d["train"]["compile"] = compile
    try:
        return recipe_from_dict(d, f"{base.source} (objective {name})", registry)
    except UserError as exc:
        raise BenchError(f"--objectives {name}: {exc}") from None


# -- measurement helpers --------------------------------------------------------------------------------------
class Timer:
    """Wall time of a callable on `device`: CUDA events on a GPU, perf_counter around a synchronise elsewhere."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], Any]) -> float:
        import torch

        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)

    def steps(self, fn: Callable[[int], Any], n: int) -> list[float]:
        """ms of each of `n` calls fn(0), ..., fn(n - 1) launched back to back, as a training loop without host
        synchronisation runs them: on CUDA the intervals between consecutive end-of-call events (one synchronise,
        after the last), so the host's launch work for call i + 1 overlaps the device's work for call i, and a
        small model is not charged a launch gap per step that training does not pay; elsewhere perf_counter
        around each call."""
        import torch

        if not self.cuda:
            return [self(lambda i=i: fn(i)) for i in range(n)]
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        ends = []
        for i in range(n):
            fn(i)
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            ends.append(e)
        ends[-1].synchronize()
        out, prev = [], start
        for e in ends:
            out.append(prev.elapsed_time(e))
            prev = e
        return out


def matmul_tflops(device, n: int = 0, iters: int = 20) -> tuple[float, str]:
    """The measured matrix rate: TFLOP/s of an n x n x n matmul (bf16 on CUDA, float32 on the CPU), median."""
    import torch

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    timer = Timer(device)
    for _ in range(3):
        a @ b
    timer.sync()
    ms = statistics.median(timer(lambda: a @ b) for _ in range(iters))
    return 2 * n ** 3 / (ms / 1e3) / 1e12, str(dtype).replace("torch.", "")


@contextlib.contextmanager
def eager_only():
    """torch.compile'd functions run eagerly inside (so the FLOP counter sees every op)."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _cpu_attention_formulas() -> dict:
    """torch's FLOP formulas of the CUDA flash-attention kernels, applied to the CPU flash kernels too (the counter
    registers no formula for them; the arguments are laid out alike)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = [("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward")]
    out = {}
    for cpu_op, cuda_op in pairs:
        if hasattr(aten, cpu_op) and getattr(aten, cuda_op) in fc.flop_registry:
            formula = fc.flop_registry[getattr(aten, cuda_op)]

            def raw(*args, _f=formula, **kwargs):
                return _f(*args, **kwargs)

            raw._get_raw = True  # already takes tensors (the registry's shape wrapper is inside)
            out[getattr(aten, cpu_op)] = raw
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as torch.utils.flop_counter counts them (matmul, conv, attention; fwd and bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    with eager_only():
        counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
        with counter:
            fn()
    return int(counter.get_total_flops())


def random_batch(spec, batch: int, device, seed: int = 0):
    """Random non-zero data of the data's shape: x ~ N(0, 1) clipped to [-1, 1]... and labels/conditions."""
    import torch

    from .interfaces import Batch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((batch, *spec.shape), device=device, generator=g).clamp_(-3, 3)
    y = torch.randint(0, spec.num_classes, (batch,), device=device, generator=g) if spec.num_classes > 0 else None
    cond = {k: torch.randn((batch, *shape), device=device, generator=g) for k, shape in spec.cond_shapes.items()}
    return Batch(x, y, cond)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent,
                               capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def card_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# -- the bare step ----------------------------------------------------------------------------------------------
def fused_attention_jvp(net, spec, device) -> str:
    """Whether forward-mode AD (torch.func.jvp) runs through torch's fused attention (SDPA) on this device, for a
    backbone that can switch its attention (`set_attention`): "yes", or "no (the error)"; "" for other backbones.
    Leaves the backbone on fused attention."""
    import torch

    if not hasattr(net, "set_attention"):
        return ""
    b = random_batch(spec, 2, device, seed=99)
    t = torch.rand(2, device=device, generator=torch.Generator(device=device).manual_seed(99))
    net.set_attention("fused")
    try:
        torch.func.jvp(lambda z: net(z, t, t, b.y, **b.cond), (b.x,), (torch.randn_like(b.x),))
        return "yes"
    except Exception as exc:  # noqa: BLE001 - the message is the measurement
        return f"no ({type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''})"


def bare_step(recipe: Recipe, *, steps: int, warmup: int, device, registry: Any = None,
              flop_steps: int = 2, notes: list[str] | None = None, profile: Path | None = None,
              label: str = "step") -> StepRow:
    """Median ms of loss + backward + optimizer step on random data, peak memory and FLOPs per step. With `notes`
    (a list) it also probes whether forward-mode AD runs through fused attention here, and appends the answer.
    With `profile` (a folder) it also profiles a few more steps (profile_breakdown) and writes the trace there."""
    import torch

    from .build import build_components
    from .engine.trainer import make_optimizer

    tr = recipe.train
    row = StepRow(objective="")
    comps = build_components(recipe, device=device, registry=registry)
    net, objective = comps.net, comps.objective
    objective.prepare(net)
    model = torch.compile(net, mode=tr["compile_mode"]) if tr["compile"] else net
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], tr, device)
    batches = [random_batch(comps.data.spec, tr["batch"], device, seed=k) for k in range(4)]
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if tr["precision"] == "bf16"
                else contextlib.nullcontext())
    if tr["precision"] == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    last: dict[str, Any] = {}

    def step(i: int, m=model) -> None:
        with autocast:
            out = objective.loss(m, batches[i % len(batches)], i)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = out.loss.detach()

    timer = Timer(device)
    torch.manual_seed(tr["seed"])
    for i in range(warmup):
        step(i)
    timer.sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timer.steps(lambda i: step(warmup + i), steps)
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    row.loss_finite = bool(torch.isfinite(last["loss"]))
    if profile is not None:
        row.profile = profile_steps(lambda i: step(warmup + steps + i), device, Path(profile), label)
    flops = [count_flops(lambda i=i: step(warmup + steps + i, net)) for i in range(flop_steps)]
    row.ms, row.ms_min, row.ms_max = statistics.median(times), min(times), max(times)
    row.images_per_s = tr["batch"] / (row.ms / 1e3)
    row.gflop_per_step = statistics.mean(flops) / 1e9
    row.tflops = row.gflop_per_step / row.ms  # 1e9 FLOP / 1e-3 s = 1e12 FLOP/s
    if notes is not None:
        answer = fused_attention_jvp(net, comps.data.spec, device)
        if answer:
            notes.append(f"forward-mode AD (torch.func.jvp) through torch's fused SDPA on this device: {answer}")
    del comps, net, model, opt, objective, batches
    if device.type == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return row


# kernel (CUDA) or operator (CPU) names -> where the time goes; first match wins
_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa", "_efficient_attention", "cudnn_mha")),
          ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                      "aten::baddbmm", "aten::_addmm", "mkldnn_matmul", "triton_tem_", "convolution", "implicit_gemm",
                      "fprop", "dgrad", "wgrad")))


def kernel_kind(name: str) -> str:
    """'attention', 'matmul' or 'other' (element-wise, norms, reductions, copies, optimizer) for a kernel or
    operator name as torch.profiler reports it."""
    low = name.lower()
    for kind, keys in _KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_breakdown(kernels: Sequence[tuple[str, float, int]], window_ms: float, steps: int, top: int = 12) -> dict:
    """Where `steps` profiled steps that took `window_ms` of wall time went. `kernels`: (name, self ms summed over
    the window, calls) of every device kernel (CUDA) or operator (CPU). Per step: ms in matrix kernels, attention,
    everything else, and `idle_ms` = wall - busy (the device waiting for the host: launch gaps, syncs), with the
    `top` kernels by time."""
    busy = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms, _ in kernels:
        busy[kernel_kind(name)] += ms
    step_ms = window_ms / steps
    per = {k: v / steps for k, v in busy.items()}
    idle = max(step_ms - sum(per.values()), 0.0)
    ranked = sorted(kernels, key=lambda k: -k[1])[:top]
    return {"steps": steps, "step_ms": step_ms, "kernel_ms": per, "idle_ms": idle,
            "share": {**{k: v / step_ms for k, v in per.items()}, "idle": idle / step_ms} if step_ms > 0 else {},
            "top": [{"name": n[:160], "kind": kernel_kind(n), "ms_per_step": ms / steps, "calls_per_step": c / steps}
                    for n, ms, c in ranked]}


def profile_steps(fn: Callable[[int], Any], device, folder: Path, label: str, steps: int = 3) -> dict:
    """torch.profiler over `steps` more calls of fn (launched back to back): the breakdown (profile_breakdown) and
    the Chrome trace, gzipped, in `folder`/<label>.trace.json.gz (chrome://tracing, Perfetto)."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    timer = Timer(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    timer.sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        timer.sync()
        window_ms = 1000 * (time.perf_counter() - t0)
    kernels = []
    for e in prof.key_averages():
        if cuda:
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            ms = float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)) / 1e3
        else:
            ms = float(e.self_cpu_time_total) / 1e3
        if ms > 0:
            kernels.append((e.key, ms, int(e.count)))
    out = profile_breakdown(kernels, window_ms, steps)
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)
    raw = folder / f"{safe}.trace.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    out["trace"] = f"{raw}.gz"
    return out


def train_step_ms(recipe: Recipe, *, steps: int, warmup: int, registry: Any = None, console: Any = None) -> float:
    """ms per step of the real `fewstep train` loop on `recipe` (its data source, EMA and loggers), measured over
    the last log window of `steps` steps after at least `warmup` steps."""
    from .engine.trainer import Trainer

    d = copy.deepcopy(recipe.to_dict())
    windows = max(1, math.ceil(warmup / steps)) + 1
    d["train"].update(steps=windows * steps, log_every=steps, checkpoint_every=0, max_seconds=0.0)
    d["eval"].update(every=0, grid=1, nfe=[1])
    loggers = list(d["train"].get("loggers", ["jsonl"]))
    if "jsonl" not in loggers:
        d["train"]["loggers"] = loggers + ["jsonl"]
    probe = recipe_from_dict(d, recipe.source, registry)
    with tempfile.TemporaryDirectory(prefix="fewstep-bench-") as tmp:
        run = Path(tmp) / "run"
        Trainer(probe, run, force=True, console=console, show_progress=False, registry=registry, final_grids=False).run()
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return 1000.0 / max(float(last["steps_per_s"]), 1e-9)


# -- sampling ---------------------------------------------------------------------------------------------------
def sampling_rows(recipe: Recipe, *, nfes: Sequence[int], batch: int, iters: int, device, registry: Any = None,
                  fid: bool = True, fid_num: int = 0) -> tuple[list[SamplingRow], list[str]]:
    import torch

    from .build import build_components, build_evaluator
    from .interfaces import BuildContext

    notes: list[str] = []
    comps = build_components(recipe, device=device, registry=registry)
    net, objective, sampler, data = comps.net.eval(), comps.objective, comps.sampler, comps.data
    model = torch.compile(net, mode=recipe.train["compile_mode"]) if recipe.train["compile"] else net
    spec = data.spec
    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn((batch, *spec.shape), device=device, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), device=device, generator=g) if spec.num_classes > 0 else None
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if recipe.train["precision"] == "bf16"
                else contextlib.nullcontext())
    timer = Timer(device)
    rows = []
    for nfe in nfes:
        def gen():
            with torch.no_grad(), autocast:
                x0 = sampler.sample(objective, model, noise, y, nfe, generator=torch.Generator(device=device).manual_seed(1))
            with torch.no_grad():
                return data.to_images(x0)

        for _ in range(2):
            gen()
        timer.sync()
        ms = statistics.median(timer(gen) for _ in range(iters))
        rows.append(SamplingRow(f"{recipe.objective.name} ({recipe.sampler.name}) nfe={nfe}", batch / (ms / 1e3), ms, batch,
                                note="incl. data.to_images (VAE decode for latents)"))
    describe = getattr(data, "describe_decoder", None)
    if callable(describe):
        notes.append(describe())
    if fid:
        try:
            ev = build_evaluator("fid", BuildContext(data=spec, device=device), registry=registry)
            with torch.no_grad():
                side = data.to_images(noise[:2]).shape[-1]  # the images the evaluator would see
            rows.append(fid_feature_row(ev, side, fid_num or max(4 * batch, 2), timer))
        except Exception as exc:  # noqa: BLE001 - absent plugin or torch-fidelity, offline weights missing, etc.
            notes.append(f"FID feature extractor skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return rows, notes


def fid_feature_row(ev, side: int, n: int, timer: Timer) -> SamplingRow:
    """Images/s of the fid evaluator's streaming feature pass (what eval and stats run: Inception, mean and
    covariance; no Frechet distance) over `n` random side x side uint8 images, after a warm-up pass."""
    import torch

    write = getattr(ev, "write_statistics", None)
    if not callable(write):
        raise BenchError("the fid evaluator has no streaming feature pass (write_statistics)")
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    fbatch = min(n, 500)

    def stream(m):
        def batches():
            for i in range(0, m, fbatch):
                yield images[i:i + fbatch]
        return ImageStream(batches, m, tuple(images.shape[1:]), name="random", split="bench")

    with tempfile.TemporaryDirectory() as tmp:
        write(stream(min(n, 2 * fbatch)), Path(tmp) / "warm.npz")  # warm-up: weights, cudnn
        timer.sync()
        t0 = time.perf_counter()
        write(stream(n), Path(tmp) / "stats.npz")
        timer.sync()
        dt = time.perf_counter() - t0
    return SamplingRow(f"fid features ({side}x{side} uint8)", n / dt, 1000 * dt * fbatch / n, fbatch,
                       note=f"the streaming pass of eval/stats over {n} images: Inception, mean and covariance "
                            "(no Frechet distance)")


# -- the whole command ----------------------------------------------------------------------------------------------
def run_bench(recipe: Recipe, *, objectives: str, batch: int | None, steps: int, warmup: int, compile: bool | None,
              train_step: bool = True, sampling: bool = False, nfes: Sequence[int] = (1, 2), sample_batch: int = 0,
              fid: bool = True, fid_num: int = 0, registry: Any = None, console: Any = None,
              progress: Callable[[str], None] | None = None, profile: Path | None = None) -> BenchReport:
    import torch

    from .engine.distributed import resolve_device

    device = torch.device(resolve_device(recipe.train["device"]))
    variants = [(label, objective_variant(recipe, name, opts, batch=batch, compile=compile, registry=registry))
                for label, name, opts in parse_objectives(objectives)]
    first = variants[0][1]
    tflops, dtype = matmul_tflops(device)
    from .build import check_components

    facts = check_components(first, registry=registry)
    report = BenchReport(card=card_name(device), device=str(device), torch=torch.__version__, commit=git_commit(),
                         command=" ".join(["fewstep", *sys.argv[1:]]) if sys.argv and "fewstep" in sys.argv[0] else
                         " ".join(sys.argv), recipe=str(recipe.source),
                         backbone=f"{first.backbone.name} {first.backbone.options.get('size', '')}".strip() +
                         f" ({facts['parameters'] / 1e6:.1f}M parameters)",
                         data_shape=list(facts["shape"]), batch=first.train["batch"], precision=first.train["precision"],
                         compile=bool(first.train["compile"]), steps=steps, warmup=warmup, matmul_tflops=tflops,
                         matmul_dtype=dtype)
    if not sampling:
        for label, r in variants:
            if progress:
                progress(f"{label}: bare step")
            try:
                row = bare_step(r, steps=steps, warmup=warmup, device=device, registry=registry,
                                notes=report.notes if not report.rows else None, profile=profile, label=label)
            except torch.cuda.OutOfMemoryError:
                row = StepRow(objective=label, error="out of memory")
                torch._dynamo.reset()
                torch.cuda.empty_cache()
            row.objective = label
            row.share_of_matmul = row.tflops / tflops
            if train_step and not row.error:
                if progress:
                    progress(f"{label}: fewstep train step")
                row.train_ms = train_step_ms(r, steps=steps, warmup=warmup, registry=registry, console=console)
                row.train_over_bare = row.train_ms / row.ms
            report.rows.append(row)
        base = next((r for r in report.rows if r.objective.split(":")[0] == "fm" and not r.error), None)
        base = base or next((r for r in report.rows if not r.error), None)
        for r in report.rows:
            if base is not None and not r.error:
                r.x_fm_time = r.ms / base.ms
                r.x_fm_memory = r.peak_gib / base.peak_gib if base.peak_gib == base.peak_gib and base.peak_gib else float("nan")
    else:
        for label, r in variants:
            if progress:
                progress(f"{label}: sampling")
            rows, notes = sampling_rows(r, nfes=nfes, batch=sample_batch or r.eval["batch"], iters=max(3, min(steps, 10)),
                                        device=device, registry=registry, fid=fid and label == variants[-1][0],
                                        fid_num=fid_num)
            report.sampling += rows
            report.notes += notes
    return report


def _f(v: float, fmt: str) -> str:
    return "" if not isinstance(v, (int, float)) or v != v else format(v, fmt)


def render(report: BenchReport):
    """A rich table of the report."""
    from rich.table import Table

    title = (f"{report.card}, torch {report.torch}, {report.commit}: {report.backbone}, data {tuple(report.data_shape)}, "
             f"batch {report.batch}, {report.precision}{', compiled' if report.compile else ''}; "
             f"matmul {report.matmul_tflops:.3g} TFLOP/s ({report.matmul_dtype})")
    if report.rows:
        t = Table(title=title)
        for col in ("objective", "ms/step", "x FM", "img/s", "GiB", "x FM mem", "GFLOP", "TFLOP/s",
                    "% mm", "train ms", "train/bare"):
            t.add_column(col, justify="left" if col == "objective" else "right")
        for r in report.rows:
            if r.error:
                t.add_row(r.objective, r.error, *[""] * 9)
                continue
            t.add_row(r.objective, _f(r.ms, ".1f"), _f(r.x_fm_time, ".2f"), _f(r.images_per_s, ".0f"), _f(r.peak_gib, ".1f"),
                      _f(r.x_fm_memory, ".2f"), _f(r.gflop_per_step, ".4g"), _f(r.tflops, ".3g"),
                      _f(100 * r.share_of_matmul, ".1f"), _f(r.train_ms, ".1f"), _f(r.train_over_bare, ".2f"))
        prof = profile_table(report)
        if prof is None:
            return t
        from rich.console import Group

        return Group(t, prof)
    t = Table(title=title.replace(f"batch {report.batch}", "sampling"))
    for col in ("what", "images/s", "ms/batch", "batch", "note"):
        t.add_column(col, justify="left" if col in ("what", "note") else "right")
    for r in report.sampling:
        t.add_row(r.what, _f(r.images_per_s, ".0f"), _f(r.ms_per_batch, ".1f"), str(r.batch), r.note)
    return t


def profile_table(report: BenchReport):
    """--profile: a rich table of where each objective's profiled step went (None without profiles)."""
    from rich.table import Table

    rows = [r for r in report.rows if r.profile]
    if not rows:
        return None
    t = Table(title="where a step goes (torch.profiler, device kernels on CUDA / operators on the CPU; "
                    "idle = wall - busy)")
    for col in ("objective", "step ms", "matmul", "attention", "other", "idle", "largest kernel"):
        t.add_column(col, justify="left" if col in ("objective", "largest kernel") else "right")
    for r in rows:
        p, sh = r.profile, r.profile.get("share", {})
        big = p["top"][0] if p.get("top") else {"name": "", "ms_per_step": float("nan")}
        t.add_row(r.objective, _f(p["step_ms"], ".1f"), *(_f(100 * sh.get(k, float("nan")), ".0f") + "%"
                                                           for k in ("matmul", "attention", "other", "idle")),
                  f"{big['name'][:60]} ({_f(big['ms_per_step'], '.2f')} ms)")
    return t


def markdown(report: BenchReport) -> str:
    """The report as the markdown table docs/benchmarks.md keeps."""
    lines = [f"{report.card}; torch {report.torch}; commit {report.commit}; {report.backbone}; data "
             f"{'x'.join(map(str, report.data_shape))}; batch {report.batch}; {report.precision}"
             f"{'; compiled' if report.compile else ''}; median of {report.steps} back-to-back steps after {report.warmup}; "
             f"matmul {report.matmul_tflops:.3g} TFLOP/s ({report.matmul_dtype})", ""]
    if report.rows:
        lines += ["| objective | ms/step | x FM | images/s | peak GiB | x FM mem | GFLOP/step | TFLOP/s | % matmul | "
                  "train ms/step | train / bare |", "|---|" + "---:|" * 10]
        for r in report.rows:
            if r.error:
                lines.append(f"| {r.objective} | {r.error} |" + " |" * 9)
                continue
            lines.append(f"| {r.objective} | {_f(r.ms, '.1f')} | {_f(r.x_fm_time, '.2f')} | {_f(r.images_per_s, '.0f')} | "
                         f"{_f(r.peak_gib, '.1f')} | {_f(r.x_fm_memory, '.2f')} | {_f(r.gflop_per_step, '.4g')} | "
                         f"{_f(r.tflops, '.3g')} | {_f(100 * r.share_of_matmul, '.1f')} | {_f(r.train_ms, '.1f')} | "
                         f"{_f(r.train_over_bare, '.2f')} |")
    prof = [r for r in report.rows if r.profile]
    if prof:
        lines += ["", "| objective | profiled step ms | matmul | attention | other | idle | largest kernel (ms/step) |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in prof:
            p, sh = r.profile, r.profile.get("share", {})
            big = p["top"][0] if p.get("top") else {"name": "", "ms_per_step": float("nan")}
            lines.append(f"| {r.objective} | {_f(p['step_ms'], '.1f')} | " + " | ".join(
                f"{_f(100 * sh.get(k, float('nan')), '.0f')}%" for k in ("matmul", "attention", "other", "idle")) +
                f" | `{big['name'][:60]}` ({_f(big['ms_per_step'], '.2f')}) |")
    if report.sampling:
        lines += ["| what | images/s | ms/batch | batch |", "|---|---:|---:|---:|"]
        lines += [f"| {r.what} | {_f(r.images_per_s, '.0f')} | {_f(r.ms_per_batch, '.1f')} | {r.batch} |" for r in report.sampling]
    lines += [f"* {n}" for n in report.notes]
    return "\n".join(lines)


def write_json(report: BenchReport, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**report.to_dict(), "markdown": markdown(report)}, indent=2))
    os.replace(tmp, path)
