"""The evaluation protocol and its typed results, used by `fewstep eval` and `fewstep compare`.

A run's EMA weights generate `num` samples per NFE from fixed noise and uniform random labels: batch k
of the evaluation draws its noise and labels from a generator seeded with (seed, k), so the set of
samples is the same whatever the batch is split over (one process, or `torchrun` ranks that take
batches k with k % world == rank). For image evaluators the samples become uint8 exactly as the official
code does (``fewstep.images.to_uint8``).

Evaluators come in two kinds (``Evaluator.streams``):

- streaming evaluators (FID, KID) receive an :class:`ImageStream` of the generated images and one of the
  reference images, pull batches through their feature extractor one at a time (never every image in
  memory), and combine the ranks' partial results themselves (``stream.all_reduce_sum``, ``stream.gather_batches``);
  a reference may instead be a stored statistics file (``--reference X.npz``);
- the others receive every image (or float sample) at once, gathered on rank 0, as long as the set fits
  in :data:`MAX_IN_MEMORY_BYTES`; past that they stop with a named error.

Comparison lives in ``fewstep.comparison``, tables, plots and JSON in ``fewstep.report``.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import UserError
from .interfaces import BuildContext, Evaluator, ImageStream
from .registry import Registry, RegistryError, get_registry

#: the largest set of images (bytes, uint8) a non-streaming evaluator may get at once (8 GiB)
MAX_IN_MEMORY_BYTES = 8 << 30


class EvaluationError(UserError):
    """An evaluation (or comparison) that cannot run as asked; the message says why and what to do."""


# ======================================================================================
# evaluators: options, defaults, construction
# ======================================================================================

def default_metrics(registry: Registry | None = None) -> list[str]:
    """The evaluators that declare ``default=True`` at registration, in registration order."""
    reg = registry or get_registry()
    return [s.name for s in reg.all() if s.kind == "evaluator" and s.extras.get("default")]


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> dict; VALUE read with TOML's grammar (3 -> int, true -> bool), else a string."""
    from .recipe import tomllib

    out: dict[str, Any] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EvaluationError(f"evaluator option {text!r} must look like KEY=VALUE, e.g. inception_weights=/path/default_1.pt")
        raw = raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
            if not isinstance(value, (bool, int, float, str)):
                value = raw
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    return out


def build_evaluators(names: Sequence[str], options: dict[str, Any] | None = None, recipe_eval: dict[str, Any] | None = None,
                     registry: Registry | None = None, ctx: BuildContext | None = None) -> dict[str, Evaluator]:
    """Build the named evaluators. Each receives the options it declares, from `options`
    (command line) or, failing that, from same-named keys of the recipe's [eval] table.
    `ctx`: what the evaluators may check at build time (``ctx.data``: the spec of the run's data), else empty."""
    reg = registry or get_registry()
    options = dict(options or {})
    specs = [reg.get("evaluator", n) for n in names]
    declared = {o for s in specs for o in s.options.names}
    unused = sorted(set(options) - declared)
    if unused:
        raise EvaluationError(f"evaluator option(s) {unused} are declared by none of {list(names)} "
                              f"(their options: {', '.join(sorted(declared)) or 'none'})")
    out: dict[str, Evaluator] = {}
    for spec in specs:
        mine = {k: v for k, v in (recipe_eval or {}).items() if k in spec.options.names}
        mine.update({k: v for k, v in options.items() if k in spec.options.names})
        try:
            out[spec.name] = spec.build(ctx or BuildContext(), **spec.options.resolve(mine))
        except (RegistryError, UserError):
            raise
        except Exception as exc:  # noqa: BLE001 - say which evaluator could not be built, and why
            raise EvaluationError(f"evaluator {spec.name!r} cannot run: {exc}") from exc
    return out


# ======================================================================================
# the protocol
# ======================================================================================

@dataclass
class EvalSettings:
    metrics: list[str]
    num: int  # generated samples per NFE
    seed: int  # noise and label seed
    batch: int  # sampling batch
    ref_split: str = "train"
    ref_num: int = 0  # 0: as many reference images as generated ones (all, if fewer exist)
    reference: Path | None = None  # stored reference statistics (.npz) for streaming evaluators
    precision: str = "fp32"  # the network's arithmetic while sampling: fp32, tf32 or bf16 (eval.precision)


@dataclass(frozen=True)
class Dist:
    """Which share of the work this process does; `rank`/`world` as torchrun sets them."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, t):
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, t, main_only: bool = False):
        """`t` of every rank concatenated along dim 0 in rank order, on every rank; with `main_only`, on rank 0
        only (the others get None), so that a large set (50,000 images for `sample --out x.npz`) is held once."""
        if self.world == 1:
            return t
        import torch
        import torch.distributed as dist

        parts: list | None = [None] * self.world if (self.rank == 0 or not main_only) else None
        if main_only:
            dist.gather_object(t.cpu(), parts, dst=0)
        else:
            dist.all_gather_object(parts, t.cpu())
        return torch.cat(parts) if parts is not None else None

    def gather_batches(self, batches: list):
        """This rank's batches (tensors with equal trailing shapes) of a set dealt round robin, batch k to rank
        k % world, put together on every rank in the set's order (batch k is rank k % world's batch k // world):
        the rows one process would have, in the same order."""
        import torch

        if self.world == 1:
            return torch.cat(batches) if batches else None
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, [b.cpu() for b in batches])
        ordered = [parts[k % self.world][k // self.world] for k in range(sum(len(p) for p in parts))]
        return torch.cat(ordered) if ordered else None


def current_dist() -> Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def batch_noise(k: int, batch: int, n: int, shape: tuple[int, ...], num_classes: int, seed: int, balanced: bool = False):
    """Noise and labels of evaluation batch k (rows k*batch .. min(n, (k+1)*batch)), from a CPU generator
    seeded with (seed, k): the same rows whatever the number of processes."""
    import torch

    rows = min(n, (k + 1) * batch) - k * batch
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    noise = torch.randn((rows, *shape), generator=g)
    if num_classes <= 0:
        return noise, None
    if balanced:
        labels = (torch.arange(rows) + k * batch) % num_classes
    else:  # uniform random labels, as the official evaluation does
        labels = torch.randint(0, num_classes, (rows,), generator=g)
    return noise, labels


@contextlib.contextmanager
def sampling_precision(precision: str, device: Any):
    """The network's arithmetic while it samples: fp32 as is, tf32 (CUDA: TF32 matmuls and cuDNN convolutions,
    the flags restored afterwards) or bf16 autocast on the device's type."""
    import torch

    if precision == "fp32":
        yield
        return
    if precision == "bf16":
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            yield
        return
    if precision != "tf32":
        raise EvaluationError(f"eval.precision must be fp32, tf32 or bf16; got {precision!r}")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def generated_batches(loaded, n: int, nfe: int, seed: int, batch: int, dist: Dist = Dist(),
                      progress: Callable[[int], None] | None = None,
                      precision: str = "fp32") -> Iterator[tuple[Any, Any]]:
    """This rank's batches of generated samples (float, as `to_images` returns them) and their labels; the
    network samples in `precision` (fp32, tf32, bf16), the data source's `to_images` (a VAE decode) in its own."""
    import torch

    net, data = loaded.net, loaded.data
    was_training = net.training
    net.eval()
    try:
        for k in range(dist.rank, math.ceil(n / batch), dist.world):
            noise, labels = batch_noise(k, batch, n, data.spec.shape, data.spec.num_classes, seed)
            gen = torch.Generator(device=loaded.device).manual_seed(seed * 1_000_003 + k + 1)  # re-noising draws
            with torch.no_grad():
                with sampling_precision(precision, loaded.device):
                    x0 = loaded.sampler.sample(loaded.objective, net, noise.to(loaded.device),
                                               None if labels is None else labels.to(loaded.device), nfe, generator=gen)
                if x0.dtype in (torch.bfloat16, torch.float16):  # eval.precision bf16: the decode gets float32
                    x0 = x0.float()
                x = data.to_images(x0).float()
            if progress is not None:
                progress(len(x))
            yield x, labels
    finally:
        net.train(was_training)


@dataclass
class Reference:
    """Where reference images come from: the data source's `split`, its `num` images (0: all) after the first `skip`
    of its fixed order (two halves of a split: skip 0 and skip N/2, each with num N/2)."""

    data: Any
    name: str
    split: str
    num: int
    statistics: Path | None = None
    key: str = ""
    _samples: Any = None
    skip: int = 0

    def _limit(self) -> int | None:
        return self.skip + self.num if self.num else None

    @property
    def samples(self):
        """(N, ...) float samples, all at once (non-streaming evaluators)."""
        if self._samples is None:
            try:
                self._samples = self.data.reference_images(self.split, limit=self._limit())[self.skip:]
            except NotImplementedError as exc:
                raise EvaluationError(f"data source {self.name!r} cannot provide reference images: {exc}") from None
        return self._samples

    def stream(self, batch: int, dist: Dist, shape: tuple[int, ...] | None) -> ImageStream:
        from .images import to_uint8

        def batches():
            try:
                # rank r's k-th batch is global batch r + k * world (the reference_batches contract), so its first
                # row has index (r + k * world) * batch: rows before `skip` are dropped, on every rank alike
                for k, x in enumerate(self.data.reference_batches(self.split, batch, self._limit(), dist.rank,
                                                                  dist.world)):
                    drop = self.skip - (dist.rank + k * dist.world) * batch
                    if drop > 0:
                        x = x[drop:]
                    if len(x):
                        yield to_uint8(x)
            except NotImplementedError as exc:
                raise EvaluationError(f"data source {self.name!r} cannot provide reference images: {exc}") from None

        return ImageStream(batches, self.num, shape, name=self.name, split=self.split, key=self.key,
                           statistics=self.statistics, all_reduce_sum=dist.all_reduce_sum, gather=dist.gather,
                           gather_batches=dist.gather_batches, rank=dist.rank, world=dist.world)


def reference_of(loaded, split: str, num: int, statistics: Path | None = None) -> Reference:
    """The reference of a loaded run: the first `num` images of its data source's `split` (0: all), named for
    caches by the data recipe, or the stored `statistics` file."""
    r = loaded.recipe
    key = json.dumps({"data": {"name": r.data.name, **r.data.options}, "split": split, "num": num}, sort_keys=True, default=str)
    return Reference(loaded.data, loaded.data.spec.name or r.data.name, split, num, statistics, key)


def checkpoint_step(ckpt_dir: Path) -> int:
    return int(json.loads((ckpt_dir / "meta.json").read_text())["step"])


def load_ema_into(loaded, ckpt_dir: Path, ema_index: int = 0) -> None:
    """Put checkpoint `ckpt_dir`'s EMA copy `ema_index` into the loaded run's network."""
    from .engine import checkpoint as ckpt

    try:
        state = ckpt.load_ema_weights(ckpt_dir, ema_index, loaded.device)
    except FileNotFoundError as exc:
        raise EvaluationError(str(exc)) from None
    loaded.net.load_state_dict(state)
    loaded.net.eval()


@dataclass
class NfeResult:
    """The metrics of one NFE (or the error that stopped them)."""

    nfe: int
    metrics: dict[str, float] = field(default_factory=dict)
    sample_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {"nfe": self.nfe, "metrics": self.metrics, "sample_seconds": self.sample_seconds, "eval_seconds": self.eval_seconds}
        if self.error:
            d["error"] = self.error
        return d


def _in_memory(total_bytes: int, what: str) -> None:
    if total_bytes > MAX_IN_MEMORY_BYTES:
        raise EvaluationError(
            f"{what} need every image in memory at once ({total_bytes / 2**30:.1f} GiB, more than the "
            f"{MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB fewstep allows); evaluate fewer samples (--num) or use the "
            f"streaming evaluators (fid, kid)")


def evaluate_loaded(loaded, nfes: Sequence[int], evaluators: dict[str, Evaluator], settings: EvalSettings,
                    reference: Reference, progress: Any = None, label: str = "", dist: Dist | None = None) -> list[NfeResult]:
    """Sample `settings.num` images per NFE from the loaded network and run every evaluator.

    Streaming evaluators pull generated batches as they are sampled (sampling runs inside their feature
    pass); the others get uint8 (N, C, H, W) images or, with ``inputs == "samples"``, the float samples,
    and ``labels=``: the (N,) int64 classes the samples were asked for, row for row (None: unconditional data).
    `progress` is a rich Progress (or None); only rank 0 shows it.
    """
    import torch

    from .images import to_uint8

    dist = dist or current_dist()
    progress = progress if dist.is_main else None
    data = loaded.data
    peers = list(evaluators.values())
    streaming = {n: e for n, e in evaluators.items() if getattr(e, "streams", False)}
    whole = {n: e for n, e in evaluators.items() if n not in streaming}
    shape = tuple(data.spec.shape)
    out = []
    for nfe in nfes:
        task = progress.add_task(f"{label}sample nfe={nfe}", total=settings.num) if progress else None
        advance = (lambda n, t=task: progress.advance(t, n)) if progress else None
        t0 = time.perf_counter()
        sampled = [0.0]
        metrics: dict[str, float] = {}
        shared: dict[str, Any] = {}  # one NFE's cache the evaluators may share (e.g. generated features)
        info = dict(nfe=nfe, num_samples=settings.num, objective=loaded.objective, net=loaded.net, sampler=loaded.sampler,
                    data=data, device=loaded.device, reference_name=reference.name, reference_split=reference.split,
                    peers=peers, shared=shared)
        if streaming:
            def gen_batches(nfe=nfe):
                for x, _ in generated_batches(loaded, settings.num, nfe, settings.seed, settings.batch, dist, advance,
                                             settings.precision):
                    yield to_uint8(x)

            gen_stream = ImageStream(gen_batches, settings.num, None, name="generated", key="",
                                     all_reduce_sum=dist.all_reduce_sum, gather=dist.gather,
                                     gather_batches=dist.gather_batches, rank=dist.rank, world=dist.world)
            ref_stream = reference.stream(settings.batch, dist, None)
            for name, ev in streaming.items():
                metrics.update(ev.evaluate_stream(gen_stream, ref_stream, **info))
        if whole:
            if streaming and task is not None:
                progress.reset(task)
            ts = time.perf_counter()
            drawn = list(generated_batches(loaded, settings.num, nfe, settings.seed, settings.batch, dist, advance,
                                             settings.precision))
            parts = [x for x, _ in drawn]
            per_row = int(parts[0][0].numel()) if parts else 1  # what to_images returns (pixels, for latent data)
            _in_memory(settings.num * per_row, f"evaluators {sorted(whole)}")
            samples = dist.gather_batches(parts)  # every rank: all `num` samples, in the order one process has them
            samples = torch.zeros((0, *shape)) if samples is None else samples
            labels = None  # the classes asked for, in the rows' order (gathered like the samples)
            if data.spec.num_classes > 0:
                labels = dist.gather_batches([y for _, y in drawn])
                labels = torch.zeros(0, dtype=torch.long) if labels is None else labels
            sampled[0] = time.perf_counter() - ts
            images = None
            for name, ev in whole.items():
                if ev.inputs == "images":
                    images = to_uint8(samples) if images is None else images
                    gen, ref = images, to_uint8(reference.samples)
                else:
                    gen, ref = samples, reference.samples
                metrics.update(ev.evaluate(gen, ref, labels=labels, **info))
        t1 = time.perf_counter()
        # streaming: sampling runs inside the evaluators' feature pass, so its seconds hold both
        out.append(NfeResult(int(nfe), metrics, t1 - t0 if streaming else sampled[0], 0.0 if streaming else t1 - t0 - sampled[0]))
        if progress:
            progress.remove_task(task)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            progress.console.log(f"{label}nfe={nfe}: {shown} ({t1 - t0:.1f} s sampling and metrics)")
    return out


def protocol(loaded, settings: EvalSettings, evaluators: dict[str, Evaluator], ema_index: int,
             reference: Reference) -> dict[str, Any]:
    """What produced the numbers: enough to reproduce them."""
    r = loaded.recipe
    from .engine.ema import ema_labels

    labels, nh = ema_labels(r.train), len(r.train.get("ema_halflife_kimg", []))
    return {
        "weights": "raw weights" if ema_index < 0 else
                   f"EMA copy {ema_index} ({'' if ema_index < nh else 'decay '}{labels[ema_index]})",
        "num_samples": settings.num,
        "labels": "uniform random" if loaded.data.spec.num_classes > 0 else "unconditional",
        "noise_seed": settings.seed,
        "noise": "batch k of `batch` rows from a CPU generator seeded with seed * 1000003 + k",
        "batch": settings.batch,
        "precision": settings.precision,
        "objective": {"name": r.objective.name, **r.objective.options},
        "sampler": {"name": r.sampler.name, **r.sampler.options},
        "data": {"name": r.data.name, **r.data.options},
        "reference": {"dataset": reference.name, "split": reference.split, "num": reference.num,
                      "statistics": str(reference.statistics) if reference.statistics else None,
                      "resolution": list(loaded.data.spec.shape)},
        "uint8": "floor(clamp(127.5 x + 128, 0, 255))",
        "device": str(loaded.device),
        "evaluators": {name: jsonable(getattr(ev, "record", {})) for name, ev in evaluators.items()},
    }


@dataclass
class RunEvaluation:
    """`fewstep eval`'s result (the payload of eval.json)."""

    run: Path
    checkpoint: Path
    step: int
    results: list[NfeResult]
    protocol: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"run": str(self.run), "checkpoint": str(self.checkpoint), "step": self.step,
                "results": [r.to_dict() for r in self.results], "protocol": self.protocol, "seconds": self.seconds}


def evaluate_run(run_dir: Path, nfes: Sequence[int], settings: EvalSettings, options: dict[str, Any] | None = None,
                 ema_index: int = 0, progress: Any = None, registry: Registry | None = None,
                 dist: Dist | None = None, device: str = "auto") -> RunEvaluation:
    """`fewstep eval`: the latest checkpoint's EMA weights at every NFE."""
    from .runs import load_model

    loaded = load_model(run_dir, ema_index=ema_index, registry=registry, device=device)
    evaluators = build_evaluators(settings.metrics, options, loaded.recipe.eval, registry, BuildContext(data=loaded.data.spec))
    return evaluate_built(Path(run_dir), loaded, nfes, evaluators, settings, ema_index, progress, dist)


def evaluate_built(run_dir: Path, loaded, nfes: Sequence[int], evaluators: dict[str, Evaluator], settings: EvalSettings,
                   ema_index: int = 0, progress: Any = None, dist: Dist | None = None) -> RunEvaluation:
    """`fewstep eval`'s protocol on a loaded run whose evaluators are built (also `eval.after_train`)."""
    reference = reference_of(loaded, settings.ref_split, settings.ref_num or settings.num, settings.reference)
    t0 = time.perf_counter()
    results = evaluate_loaded(loaded, nfes, evaluators, settings, reference, progress, dist=dist)
    return RunEvaluation(run_dir, loaded.checkpoint, checkpoint_step(loaded.checkpoint), results,
                         protocol(loaded, settings, evaluators, ema_index, reference), time.perf_counter() - t0)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    return obj
