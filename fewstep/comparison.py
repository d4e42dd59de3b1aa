"""Comparing objectives head to head (`fewstep compare`): plan, budget, train, evaluate, summarise.

One recipe, only ``[objective]`` swapped (its other keys dropped so each objective gets its own
defaults, and ``[sampler]`` dropped so each uses its default sampler); identical backbone, data, data
order, seeds and budget (equal steps, or equal wall-clock time). Each run is evaluated with the protocol
of ``fewstep.evaluation`` at every requested NFE (and at its intermediate checkpoints, at the smallest
NFE). The result is a typed :class:`Comparison`; this module draws nothing and writes no report:
``fewstep.report`` turns a Comparison into the table, the pictures and compare.json.

Runs live in ``OUT/<objective>/seed<k>``. A compare that was interrupted continues where it stopped
when called again: a finished run (``compare_train.json`` with the identical recipe) is reused, a run
with checkpoints but no ``compare_train.json`` resumes from its latest checkpoint (``Trainer(resume=True)``,
bit-identical to an uninterrupted run), and only ``--force`` trains them again from scratch.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .evaluation import (Dist, EvalSettings, EvaluationError, NfeResult, build_evaluators, checkpoint_step, default_metrics,
                         evaluate_loaded, jsonable, load_ema_into, protocol, reference_of)
from .interfaces import Evaluator
from .recipe import Recipe, RecipeError, recipe_from_dict
from .registry import Registry, RegistryError, get_registry

CompareError = EvaluationError  # the name older code used
BUDGETS = ("equal-steps", "equal-time")
PROBE_STEPS = 20  # equal-time: steps of the timing probe that sets each objective's step count


def default_recipe(registry: Registry | None = None) -> Path | None:
    """The recipe `fewstep compare` runs without --recipe: the first registered dataset that names one
    (``register(..., compare_recipe="x.toml")``), looked up in recipes/ of fewstep's source tree, then of the
    working directory."""
    reg = registry or get_registry()
    names = [s.extras["compare_recipe"] for s in reg.all() if s.kind == "dataset" and s.extras.get("compare_recipe")]
    for name in names:
        for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
            p = root / "recipes" / name
            if p.is_file():
                return p
    return None


@dataclass
class TrainInfo:
    """What a training run cost (from the trainer, or reconstructed from metrics.jsonl)."""

    steps: int
    wall_seconds: float
    ms_per_step: float
    peak_memory_mb: float | None
    num_params: int | None
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "wall_seconds": self.wall_seconds, "ms_per_step": self.ms_per_step,
                "peak_memory_mb": self.peak_memory_mb, "num_params": self.num_params}


@dataclass
class RunRef:
    label: str  # the objective (or the folder, when ambiguous)
    seed: int
    run_dir: Path
    train: TrainInfo | None = None


@dataclass
class CompareSpec:
    objectives: list[str]
    base: Recipe  # the shared recipe (its [objective] and [sampler] are replaced per objective)
    out: Path
    nfes: list[int]
    seeds: list[int]
    metrics: list[str]
    budget: str = "equal-steps"
    seconds: float = 0.0  # equal-time: explicit budget (0: the first objective's time for its steps)
    options: dict[str, Any] = field(default_factory=dict)  # evaluator options
    reference: Path | None = None  # stored reference statistics (.npz) for streaming evaluators
    force: bool = False
    curve: bool = True  # evaluate intermediate checkpoints (smallest NFE)


def objective_recipe(base: Recipe, objective: str, seed: int, eval_seed: int, registry: Registry | None = None,
                     **train_overrides: Any) -> Recipe:
    """`base` with only the objective swapped: objective keys and [sampler] dropped (each its defaults)."""
    d = copy.deepcopy(base.to_dict())
    d["name"] = f"{base.name}-{objective}-seed{seed}"
    d["objective"] = {"name": objective}
    d.pop("sampler", None)
    d["train"].update(seed=seed, **train_overrides)
    d["eval"]["seed"] = eval_seed
    try:
        return recipe_from_dict(d, f"{base.source} (objective {objective})", registry)
    except RecipeError as exc:
        raise EvaluationError(str(exc)) from None


def _train_json(run_dir: Path) -> Path:
    return run_dir / "compare_train.json"


def train_info_from_folder(run_dir: Path, num_params: int | None = None) -> TrainInfo:
    """A run's cost from compare_train.json, else from the last line of metrics.jsonl."""
    p = _train_json(run_dir)
    if p.is_file():
        d = json.loads(p.read_text())
        return TrainInfo(d["steps"], d["wall_seconds"], d["ms_per_step"], d.get("peak_memory_mb"), d.get("num_params"), reused=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    if not lines:
        return TrainInfo(0, float("nan"), float("nan"), None, num_params, reused=True)
    last = json.loads(lines[-1])
    step, wall = int(last["step"]), float(last.get("time", float("nan")))
    return TrainInfo(step, wall, 1000 * wall / max(step, 1), None, num_params, reused=True)


def train_one(recipe: Recipe, run_dir: Path, force: bool, console: Any, registry: Registry | None = None,
              dist: Dist = Dist()) -> TrainInfo:
    """Train `recipe` into `run_dir`; without `force`, continue what an interrupted compare left there.

    Same recipe and compare_train.json: finished, reused. Same recipe and a checkpoint: resumed from it.
    Same recipe and no checkpoint yet: started again (nothing to lose). Another recipe: an error naming
    --force. Under torchrun every rank decides from the same files (barriers around the look) and trains its
    share (the trainer's DDP); rank 0 alone writes.
    """
    from .engine import checkpoint as ckpt
    from .engine.trainer import RunFolderError, Trainer

    dist.barrier()  # the previous run is written (rank 0) before any rank looks at this one
    same = (run_dir / "recipe.toml").is_file() and (run_dir / "recipe.toml").read_text() == recipe.to_toml()
    done = not force and same and _train_json(run_dir).is_file()
    resume = not force and same and not done and ckpt.latest_checkpoint(run_dir / "checkpoints") is not None
    dist.barrier()  # every rank has looked before rank 0 writes this run's files
    if done:
        console.log(f"reusing the finished run in {run_dir} (same recipe; --force retrains)")
        return train_info_from_folder(run_dir)
    if resume:
        console.log(f"continuing the interrupted run in {run_dir} from its latest checkpoint (--force retrains)")
    try:
        res = Trainer(recipe, run_dir, resume=resume, force=force or (same and not resume), console=console,
                      registry=registry).run()
    except RunFolderError as exc:
        raise EvaluationError(f"{exc} (fewstep compare: pass --force to retrain, or --out for a new folder)") from None
    peak = None if math.isnan(res.peak_memory_mb) else res.peak_memory_mb
    info = TrainInfo(res.step, res.wall_seconds, res.ms_per_step, peak, res.num_params)
    if dist.is_main:
        _train_json(run_dir).write_text(json.dumps(info.to_dict(), indent=2))
    return info


def probe_ms_per_step(recipe: Recipe, scratch: Path, console: Any, registry: Registry | None = None) -> float:
    """Milliseconds per step of `recipe`, measured over the second half of a short run (warm-up excluded)."""
    from .engine.trainer import Trainer

    d = copy.deepcopy(recipe.to_dict())
    d["train"].update(steps=PROBE_STEPS, log_every=PROBE_STEPS // 2, checkpoint_every=0, max_seconds=0.0)
    d["eval"].update(every=0, grid=1, nfe=[1], after_train=[])
    probe = recipe_from_dict(d, recipe.source, registry)
    Trainer(probe, scratch, force=True, console=console, show_progress=False, registry=registry).run()
    last = json.loads((scratch / "metrics.jsonl").read_text().splitlines()[-1])
    return 1000.0 / max(float(last["steps_per_s"]), 1e-9)


def train_all(spec: CompareSpec, console: Any, registry: Registry | None = None, dist: Dist = Dist()) -> list[RunRef]:
    """Train every objective for every seed under one budget; returns the runs in (seed, objective) order."""
    import shutil

    base_steps = spec.base.train["steps"]
    refs: list[RunRef] = []
    budget_s = spec.seconds
    steps_for: dict[str, int] = {}
    for si, seed in enumerate(spec.seeds):
        eval_seed = spec.base.eval["seed"] + si
        for oi, obj in enumerate(spec.objectives):
            run_dir = spec.out / obj / f"seed{seed}"
            overrides: dict[str, Any] = {}
            if spec.budget == "equal-time":
                if oi == 0 and not spec.seconds:
                    # the first objective defines the budget: its time for `steps`
                    overrides = {"steps": base_steps, "max_seconds": budget_s if si > 0 else 0.0}
                else:
                    if obj not in steps_for:
                        scratch = spec.out / ".probe" / obj
                        ms = probe_ms_per_step(objective_recipe(spec.base, obj, seed, eval_seed, registry), scratch, console, registry)
                        shutil.rmtree(scratch, ignore_errors=True)
                        steps_for[obj] = max(1, math.ceil(1.1 * budget_s * 1000.0 / ms))  # 10% slack; max_seconds stops it
                        console.log(f"equal-time: {obj} runs ~{ms:.1f} ms/step -> up to {steps_for[obj]} steps in {budget_s:.1f} s")
                    overrides = {"steps": steps_for[obj], "max_seconds": budget_s}
            recipe = objective_recipe(spec.base, obj, seed, eval_seed, registry, **overrides)
            console.log(f"[bold]training {obj}[/bold] (seed {seed}) -> {run_dir}")
            info = train_one(recipe, run_dir, spec.force, console, registry, dist)
            if spec.budget == "equal-time" and oi == 0 and si == 0 and not spec.seconds:
                budget_s = info.wall_seconds
                console.log(f"equal-time budget: {budget_s:.1f} s of training per run (the time {obj} took for {info.steps} steps)")
            refs.append(RunRef(obj, seed, run_dir, info))
    shutil.rmtree(spec.out / ".probe", ignore_errors=True)
    spec.seconds = budget_s
    return refs


def refs_from_folders(folders: Sequence[Path], registry: Registry | None = None) -> list[RunRef]:
    """Existing run folders as comparison entries: label = objective (the folder path when objective and seed repeat)."""
    from .engine.trainer import RunFolderError, load_run_recipe

    raw = []
    for f in folders:
        try:
            r = load_run_recipe(f, registry)
        except (RunFolderError, RecipeError, RegistryError) as exc:
            raise EvaluationError(str(exc)) from None
        raw.append((r.objective.name, r.train["seed"], Path(f)))
    seen: dict[tuple[str, int], int] = {}
    for obj, seed, _ in raw:
        seen[(obj, seed)] = seen.get((obj, seed), 0) + 1
    return [RunRef(obj if seen[(obj, seed)] == 1 else str(f), seed, f, train_info_from_folder(f)) for obj, seed, f in raw]




# -- evaluating every run ---------------------------------------------------------------------------

@dataclass
class RunResult:
    """One run's results at every NFE."""

    label: str
    seed: int
    run: Path
    step: int
    sampler: dict[str, Any]
    train: TrainInfo | None
    results: list[NfeResult]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "seed": self.seed, "run": str(self.run), "step": self.step, "sampler": self.sampler,
                "train": self.train.to_dict() if self.train else None, "results": [r.to_dict() for r in self.results]}


@dataclass
class CurvePoint:
    """A metric of one checkpoint at the smallest NFE (metric-vs-step curves)."""

    label: str
    seed: int
    step: int
    nfe: int
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "seed": self.seed, "step": self.step, "nfe": self.nfe, "metrics": self.metrics}


@dataclass
class MetricSummary:
    values: list[float | None]
    mean: float | None
    std: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "mean": self.mean, "std": self.std}


@dataclass
class Entry:
    """One (objective, NFE): per-seed values, mean and std of every metric and of the training cost."""

    objective: str
    nfe: int
    sampler: dict[str, Any]
    seeds: list[int]
    metrics: dict[str, MetricSummary]
    train: dict[str, Any]
    runs: list[str]
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {"objective": self.objective, "nfe": self.nfe, "sampler": self.sampler, "seeds": self.seeds,
             "metrics": {k: v.to_dict() for k, v in self.metrics.items()}, "train": self.train, "runs": self.runs}
        if self.errors:
            d["errors"] = self.errors
        return d


def evaluate_all(refs: list[RunRef], spec: CompareSpec, console: Any, registry: Registry | None = None,
                 evaluators: dict[str, Evaluator] | None = None, dist: Dist | None = None, device: str = "auto"
                 ) -> tuple[list[RunResult], list[CurvePoint], dict[str, Any]]:
    """Evaluate every run at every NFE (and intermediate checkpoints at the smallest NFE); under torchrun every
    rank samples and extracts features for its share of each evaluation, on `device` (its own GPU)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine import checkpoint as ckpt
    from .runs import load_model

    evaluators = evaluators or build_evaluators(spec.metrics, spec.options, spec.base.eval, registry)
    per_run: list[RunResult] = []
    curves: list[CurvePoint] = []
    proto: dict[str, Any] = {}
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, transient=False) as progress:
        for i, ref in enumerate(refs):
            loaded = load_model(ref.run_dir, registry=registry, device=device)
            r = loaded.recipe
            ev = spec.base.eval  # one protocol for every run; seed index k uses eval.seed + k for all objectives
            seed_index = spec.seeds.index(ref.seed) if ref.seed in spec.seeds else 0
            settings = EvalSettings(list(spec.metrics), ev["num_samples"], ev["seed"] + seed_index, ev["batch"],
                                    reference=spec.reference, precision=ev["precision"])
            reference = reference_of(loaded, settings.ref_split, settings.num, spec.reference)
            if ref.train is not None and ref.train.num_params is None:
                ref.train.num_params = sum(p.numel() for p in loaded.net.parameters())
            label = f"{ref.label} s{ref.seed} "
            final = loaded.checkpoint
            results: list[NfeResult] = []
            for nfe in spec.nfes:
                try:
                    results += evaluate_loaded(loaded, [nfe], evaluators, settings, reference, progress, label, dist)
                except EvaluationError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one failing sampler/NFE must not lose the other results
                    console.log(f"[red]{ref.label} seed {ref.seed} nfe {nfe} failed: {type(exc).__name__}: {exc}")
                    results.append(NfeResult(nfe, error=f"{type(exc).__name__}: {exc}"))
            step = checkpoint_step(final)
            per_run.append(RunResult(ref.label, ref.seed, ref.run_dir, step, {"name": r.sampler.name, **r.sampler.options},
                                     ref.train, results))
            first = next((x for x in results if x.nfe == min(spec.nfes)), None)
            if first and first.metrics:
                curves.append(CurvePoint(ref.label, ref.seed, step, min(spec.nfes), first.metrics))
            if spec.curve:
                for c in ckpt.list_checkpoints(ref.run_dir / "checkpoints"):
                    if c.resolve() == final.resolve():
                        continue
                    load_ema_into(loaded, c)
                    try:
                        res = evaluate_loaded(loaded, [min(spec.nfes)], evaluators, settings, reference, progress,
                                              f"{label}step {checkpoint_step(c)} ", dist)
                    except Exception as exc:  # noqa: BLE001 - as above
                        console.log(f"[red]{ref.label} seed {ref.seed} checkpoint {c.name} failed: {type(exc).__name__}: {exc}")
                        continue
                    curves.append(CurvePoint(ref.label, ref.seed, checkpoint_step(c), min(spec.nfes), res[0].metrics))
                load_ema_into(loaded, final)
            if i == 0:
                proto = protocol(loaded, settings, evaluators, 0, reference)
    curves.sort(key=lambda c: (c.label, c.seed, c.step))
    return per_run, curves, proto


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(per_run: list[RunResult], labels: Sequence[str], nfes: Sequence[int]) -> list[Entry]:
    """One entry per (objective, NFE)."""
    entries = []
    for label in labels:
        runs = [r for r in per_run if r.label == label]
        if not runs:
            continue
        for nfe in nfes:
            rows = [next((x for x in r.results if x.nfe == nfe), NfeResult(nfe)) for r in runs]
            names = list(dict.fromkeys(k for row in rows for k in row.metrics))  # evaluator order
            metrics = {}
            for k in names:
                values = [row.metrics.get(k) for row in rows]
                metrics[k] = MetricSummary(values, *_mean_std(values))
            train = {k: [getattr(r.train, k) if r.train else None for r in runs]
                     for k in ("steps", "wall_seconds", "ms_per_step", "peak_memory_mb")}
            params = next((r.train.num_params for r in runs if r.train and r.train.num_params), None)
            entries.append(Entry(label, int(nfe), runs[0].sampler, [r.seed for r in runs], metrics,
                                 {**train, "num_params": params}, [str(r.run) for r in runs],
                                 [row.error for row in rows if row.error]))
    return entries


@dataclass
class Comparison:
    """Everything `fewstep compare` found; ``fewstep.report`` renders it."""

    spec: CompareSpec
    labels: list[str]
    entries: list[Entry]
    curves: list[CurvePoint]
    runs: list[RunResult]
    protocol: dict[str, Any]
    evaluators: dict[str, Evaluator]
    from_runs: bool
    n_seeds: int
    wall_seconds: float = 0.0

    def protocol_record(self) -> dict[str, Any]:
        spec, runs = self.spec, self.from_runs
        return {
            **{k: v for k, v in self.protocol.items() if k not in ("objective", "sampler")},
            "recipe": spec.base.source if not runs else None,
            "budget": "existing runs" if runs else spec.budget,
            "steps": None if runs else spec.base.train["steps"],
            "seconds": spec.seconds if (not runs and spec.budget == "equal-time") else None,
            "seeds": spec.seeds if not runs else sorted({r.seed for r in self.runs}),
            "nfe": list(spec.nfes),
            "metrics": list(spec.metrics),
            "objectives": self.labels,
            "sampler": "each objective's default sampler" if not runs else "each run's own",
            "shared": {k: v for k, v in spec.base.to_dict().items() if k in ("data", "backbone", "train")} if not runs else None,
        }


def run_compare(spec: CompareSpec, console: Any, runs: Sequence[Path] = (), registry: Registry | None = None,
                on_stage: Callable[[str], None] | None = None, dist: Dist | None = None, device: str = "auto") -> Comparison:
    """Train (or take `runs`), evaluate, summarise. Writes only the runs (and their compare_train.json).

    Under torchrun (`dist` of several ranks) training is the trainer's DDP and each evaluation is split over the
    ranks (`device`: this rank's); every rank returns the same Comparison."""
    import time

    t0 = time.perf_counter()
    dist = dist or Dist()
    if dist.world > 1 and not runs and spec.budget == "equal-time":
        raise EvaluationError("--budget equal-time measures each objective's wall-clock time in one process; under "
                              "torchrun use --budget equal-steps, or run the equal-time comparison without torchrun")
    spec.metrics = list(spec.metrics) or default_metrics(registry)
    # evaluators first: missing weights stop the comparison before any training
    evaluators = build_evaluators(spec.metrics, spec.options, spec.base.eval, registry)
    if len(set(spec.objectives)) != len(spec.objectives):
        raise EvaluationError(f"objectives named twice: {spec.objectives}")
    spec.out.mkdir(parents=True, exist_ok=True)
    if runs:
        refs = refs_from_folders(runs, registry)
    else:
        if spec.budget not in BUDGETS:
            raise EvaluationError(f"budget must be one of {BUDGETS}, got {spec.budget!r}")
        if not spec.objectives:
            raise EvaluationError("name at least one objective to train (or pass --runs)")
        for obj in spec.objectives:  # every recipe must validate before the first one trains
            objective_recipe(spec.base, obj, spec.seeds[0], spec.base.eval["seed"], registry)
        refs = train_all(spec, console, registry, dist)
    labels = list(dict.fromkeys(r.label for r in refs))
    if on_stage:
        on_stage("evaluating")
    per_run, curves, proto = evaluate_all(refs, spec, console, registry, evaluators, dist, device)
    entries = summarize(per_run, labels, spec.nfes)
    n_seeds = len({r.seed for r in refs}) if not runs else max(sum(1 for r in refs if r.label == lb) for lb in labels)
    return Comparison(spec, labels, entries, curves, per_run, proto, evaluators, bool(runs), n_seeds,
                      time.perf_counter() - t0)
