"""Evaluate runs, and compare objectives head to head (`fewstep eval`, `fewstep compare`).

Evaluation: a run's EMA weights generate `num` samples per NFE from fixed noise and uniform
random labels (seeded); for image evaluators the samples become uint8 exactly as the official code
does (``fewstep.images.to_uint8``), and they go, with the data source's reference samples, through
every requested evaluator. The result carries the protocol that produced it.

Comparison: one recipe, only ``[objective]`` swapped (its other keys dropped so each objective
gets its own defaults, and ``[sampler]`` dropped so each uses its default sampler); identical
backbone, data, data order, seeds and budget (equal steps, or equal wall-clock time). Each run is
evaluated at every requested NFE (and at its intermediate checkpoints, at the smallest NFE).
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .interfaces import BuildContext, Evaluator
from .recipe import Recipe, RecipeError, recipe_from_dict, toml_value
from .registry import Registry, RegistryError, get_registry

DEFAULT_METRICS = ("fid", "kid")
BUDGETS = ("equal-steps", "equal-time")
PROBE_STEPS = 20  # equal-time: steps of the timing probe that sets each objective's step count


def default_recipe() -> Path | None:
    """recipes/compare_digits.toml of the source tree fewstep runs from, else of the working directory."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        p = root / "recipes" / "compare_digits.toml"
        if p.is_file():
            return p
    return None


class CompareError(RuntimeError):
    """A comparison that cannot run as asked (the message says why and what to do)."""


# ======================================================================================
# evaluator options and construction
# ======================================================================================

def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> dict; VALUE read with TOML's grammar (3 -> int, true -> bool), else a string."""
    out: dict[str, Any] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CompareError(f"evaluator option {text!r} must look like KEY=VALUE, e.g. inception_weights=/path/default_1.pt")
        out[key] = toml_value(raw.strip(), (bool, int, float, str))
    return out


def build_evaluators(names: Sequence[str], options: dict[str, Any] | None = None, recipe_eval: dict[str, Any] | None = None,
                     registry: Registry | None = None) -> dict[str, Evaluator]:
    """Build the named evaluators. Each receives the options it declares, from `options`
    (command line) or, failing that, from same-named keys of the recipe's [eval] table."""
    reg = registry or get_registry()
    options = dict(options or {})
    specs = [reg.get("evaluator", n) for n in names]
    declared = {o for s in specs for o in s.options.names}
    unused = sorted(set(options) - declared)
    if unused:
        raise CompareError(f"evaluator option(s) {unused} are declared by none of {list(names)} "
                           f"(their options: {', '.join(sorted(declared)) or 'none'})")
    out: dict[str, Evaluator] = {}
    for spec in specs:
        mine = {k: v for k, v in (recipe_eval or {}).items() if k in spec.options.names}
        mine.update({k: v for k, v in options.items() if k in spec.options.names})
        try:
            out[spec.name] = spec.build(BuildContext(), **spec.options.resolve(mine))
        except RegistryError:
            raise
        except Exception as exc:  # noqa: BLE001 - say which evaluator could not be built, and why
            raise CompareError(f"evaluator {spec.name!r} cannot run: {exc}") from exc
    return out


# ======================================================================================
# evaluating one run
# ======================================================================================

@dataclass
class EvalSettings:
    metrics: list[str]
    num: int  # generated samples per NFE
    seed: int  # noise and label seed
    batch: int  # sampling batch
    ref_split: str = "train"
    ref_num: int = 0  # 0: as many reference images as generated ones (all, if fewer exist)


@dataclass
class Reference:
    """The data source's real samples (float: [-1, 1] images, or points) and, on demand, as uint8 images."""

    samples: Any  # (N, ...) float, as DataSource.reference_images returns them
    name: str
    split: str
    _images: Any = None

    @property
    def images(self):
        """uint8 (N, C, H, W), converted exactly like generated samples."""
        if self._images is None:
            from .images import to_uint8

            self._images = to_uint8(self.samples)
        return self._images

    def __len__(self) -> int:
        return len(self.samples)


def reference_of(data, split: str, num: int) -> Reference:
    """The first `num` reference samples of `split` from the data source."""
    try:
        samples = data.reference_images(split, limit=num)
    except NotImplementedError as exc:
        raise CompareError(f"data source {data.spec.name or type(data).__name__!r} cannot provide reference images: {exc}") from None
    return Reference(samples, data.spec.name, split)


def checkpoint_step(ckpt_dir: Path) -> int:
    return int(json.loads((ckpt_dir / "meta.json").read_text())["step"])


def load_ema_into(loaded, ckpt_dir: Path, ema_index: int = 0) -> None:
    """Put checkpoint `ckpt_dir`'s EMA copy `ema_index` into the loaded run's network."""
    from .engine import checkpoint as ckpt

    try:
        state = ckpt.load_ema_weights(ckpt_dir, ema_index, loaded.device)
    except FileNotFoundError as exc:
        raise CompareError(str(exc)) from None
    loaded.net.load_state_dict(state)
    loaded.net.eval()


def evaluate_loaded(loaded, nfes: Sequence[int], evaluators: dict[str, Evaluator], settings: EvalSettings,
                    reference: Reference, progress: Any = None, label: str = "") -> list[dict[str, Any]]:
    """Sample `settings.num` images per NFE from the loaded network and run every evaluator.

    Evaluators with ``inputs == "images"`` get uint8 (N, C, H, W) images (generated and reference
    converted the same way); those with ``inputs == "samples"`` get the float samples as generated.
    Returns one dict per NFE: {"nfe", "metrics", "sample_seconds", "eval_seconds"}. `progress` is a
    rich Progress (or None).
    """
    from .images import to_uint8
    from .sampling import generate

    data = loaded.data
    peers = list(evaluators.values())
    out = []
    for nfe in nfes:
        task = progress.add_task(f"{label}sample nfe={nfe}", total=settings.num) if progress else None
        t0 = time.perf_counter()
        samples = generate(loaded.objective, loaded.sampler, loaded.net, data, settings.num, nfe, seed=settings.seed,
                           batch=settings.batch, device=loaded.device, balanced=False,
                           progress=(lambda n, t=task: progress.advance(t, n)) if progress else None)
        t1 = time.perf_counter()
        images = None
        metrics: dict[str, float] = {}
        total = len(samples) + len(reference)
        ftask = progress.add_task(f"{label}metrics nfe={nfe}", total=total) if progress else None
        for name, ev in evaluators.items():
            if ev.inputs == "images":
                images = to_uint8(samples) if images is None else images  # (N, C, H, W) uint8
                gen, ref = images, reference.images
            else:
                gen, ref = samples, reference.samples
            metrics.update(ev.evaluate(
                gen, ref, nfe=nfe, num_samples=len(samples), objective=loaded.objective, net=loaded.net,
                sampler=loaded.sampler, data=data, device=loaded.device, reference_name=reference.name,
                reference_split=reference.split, peers=peers,
                progress=(lambda n, t=ftask: progress.advance(t, n)) if progress else None))
        out.append({"nfe": int(nfe), "metrics": metrics, "sample_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1})
        if progress:
            progress.remove_task(task)
            progress.remove_task(ftask)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            progress.console.log(f"{label}nfe={nfe}: {shown} ({out[-1]['sample_seconds']:.1f} s sampling, "
                                 f"{out[-1]['eval_seconds']:.1f} s metrics)")
    return out


def protocol(loaded, settings: EvalSettings, evaluators: dict[str, Evaluator], ema_index: int,
             reference: Reference) -> dict[str, Any]:
    """What produced the numbers: enough to reproduce them."""
    r = loaded.recipe
    decays = r.train["ema"]
    return {
        "weights": f"EMA copy {ema_index} (decay {decays[ema_index]})" if ema_index >= 0 else "raw weights",
        "num_samples": settings.num,
        "labels": "uniform random" if loaded.data.spec.num_classes > 0 else "unconditional",
        "noise_seed": settings.seed,
        "objective": {"name": r.objective.name, **r.objective.options},
        "sampler": {"name": r.sampler.name, **r.sampler.options},
        "data": {"name": r.data.name, **r.data.options},
        "reference": {"dataset": loaded.data.spec.name or r.data.name, "split": reference.split,
                      "num": len(reference), "resolution": list(reference.samples.shape[1:])},
        "uint8": "floor(clamp(127.5 x + 128, 0, 255))",
        "device": str(loaded.device),
        "evaluators": {name: _jsonable(getattr(ev, "record", {})) for name, ev in evaluators.items()},
    }


def evaluate_run(run_dir: Path, nfes: Sequence[int], settings: EvalSettings, options: dict[str, Any] | None = None,
                 ema_index: int = 0, progress: Any = None, registry: Registry | None = None) -> dict[str, Any]:
    """`fewstep eval`: the latest checkpoint's EMA weights at every NFE; the payload of eval.json."""
    from .runs import load_model

    loaded = load_model(run_dir, ema_index=ema_index, registry=registry)
    evaluators = build_evaluators(settings.metrics, options, loaded.recipe.eval, registry)
    ref_num = settings.ref_num or settings.num
    reference = reference_of(loaded.data, settings.ref_split, ref_num)
    t0 = time.perf_counter()
    results = evaluate_loaded(loaded, nfes, evaluators, settings, reference, progress)
    return {
        "run": str(run_dir),
        "checkpoint": str(loaded.checkpoint),
        "step": checkpoint_step(loaded.checkpoint),
        "results": results,
        "protocol": protocol(loaded, settings, evaluators, ema_index, reference),
        "seconds": time.perf_counter() - t0,
    }


# ======================================================================================
# comparing objectives
# ======================================================================================

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
        raise CompareError(str(exc)) from None


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


def train_one(recipe: Recipe, run_dir: Path, force: bool, console: Any, registry: Registry | None = None) -> TrainInfo:
    """Train `recipe` into `run_dir`, or reuse a finished compare run there with the identical recipe."""
    from .engine.trainer import RunFolderError, Trainer

    if not force and _train_json(run_dir).is_file() and (run_dir / "recipe.toml").is_file() \
            and (run_dir / "recipe.toml").read_text() == recipe.to_toml():
        console.log(f"reusing the finished run in {run_dir} (same recipe; --force retrains)")
        return train_info_from_folder(run_dir)
    try:
        res = Trainer(recipe, run_dir, force=force, console=console, registry=registry).run()
    except RunFolderError as exc:
        raise CompareError(f"{exc} (fewstep compare: pass --force to retrain, or --out for a new folder)") from None
    peak = None if math.isnan(res.peak_memory_mb) else res.peak_memory_mb
    info = TrainInfo(res.step, res.wall_seconds, res.ms_per_step, peak, res.num_params)
    _train_json(run_dir).write_text(json.dumps(info.to_dict(), indent=2))
    return info


def probe_ms_per_step(recipe: Recipe, scratch: Path, console: Any, registry: Registry | None = None) -> float:
    """Milliseconds per step of `recipe`, measured over the second half of a short run (warm-up excluded)."""
    from .engine.trainer import Trainer

    d = copy.deepcopy(recipe.to_dict())
    d["train"].update(steps=PROBE_STEPS, log_every=PROBE_STEPS // 2, checkpoint_every=0, max_seconds=0.0)
    d["eval"].update(every=0, grid=1, nfe=[1])
    probe = recipe_from_dict(d, recipe.source, registry)
    Trainer(probe, scratch, force=True, console=console, show_progress=False, registry=registry).run()
    last = json.loads((scratch / "metrics.jsonl").read_text().splitlines()[-1])
    return 1000.0 / max(float(last["steps_per_s"]), 1e-9)


def train_all(spec: CompareSpec, console: Any, registry: Registry | None = None) -> list[RunRef]:
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
            info = train_one(recipe, run_dir, spec.force, console, registry)
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
            raise CompareError(str(exc)) from None
        raw.append((r.objective.name, r.train["seed"], Path(f)))
    seen: dict[tuple[str, int], int] = {}
    for obj, seed, _ in raw:
        seen[(obj, seed)] = seen.get((obj, seed), 0) + 1
    return [RunRef(obj if seen[(obj, seed)] == 1 else str(f), seed, f, train_info_from_folder(f)) for obj, seed, f in raw]


# -- evaluation of all runs -------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def evaluate_all(refs: list[RunRef], spec: CompareSpec, console: Any, registry: Registry | None = None,
                 evaluators: dict[str, Evaluator] | None = None) -> tuple[list[dict], list[dict], dict[str, Any], dict]:
    """Evaluate every run at every NFE (and intermediate checkpoints at the smallest NFE).

    Returns (per-run results, curve points, protocol, sample previews {(label, nfe): PNG path}).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine import checkpoint as ckpt
    from .runs import load_model
    from .sampling import generate

    evaluators = evaluators or build_evaluators(spec.metrics, spec.options, spec.base.eval, registry)
    per_run: list[dict] = []
    curves: list[dict] = []
    grids: dict[tuple[str, int], Any] = {}
    proto: dict[str, Any] = {}
    reference = None
    ref_key = None
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, transient=False) as progress:
        for i, ref in enumerate(refs):
            loaded = load_model(ref.run_dir, registry=registry)
            r = loaded.recipe
            ev = spec.base.eval  # one protocol for every run; seed index k uses eval.seed + k for all objectives
            seed_index = spec.seeds.index(ref.seed) if ref.seed in spec.seeds else 0
            settings = EvalSettings(list(spec.metrics), ev["num_samples"], ev["seed"] + seed_index, ev["batch"])
            key = (r.data.name, tuple(sorted(r.data.options.items())), settings.num)
            if key != ref_key:
                reference, ref_key = reference_of(loaded.data, settings.ref_split, settings.num), key
            if ref.train is not None and ref.train.num_params is None:
                ref.train.num_params = sum(p.numel() for p in loaded.net.parameters())
            label = f"{ref.label} s{ref.seed} "
            final = loaded.checkpoint
            results = []
            for nfe in spec.nfes:
                try:
                    results += evaluate_loaded(loaded, [nfe], evaluators, settings, reference, progress, label)
                except Exception as exc:  # noqa: BLE001 - one failing sampler/NFE must not lose the other results
                    console.log(f"[red]{ref.label} seed {ref.seed} nfe {nfe} failed: {type(exc).__name__}: {exc}")
                    results.append({"nfe": nfe, "metrics": {}, "error": f"{type(exc).__name__}: {exc}"})
            step = checkpoint_step(final)
            per_run.append({"label": ref.label, "seed": ref.seed, "run": str(ref.run_dir), "step": step,
                            "sampler": {"name": r.sampler.name, **r.sampler.options},
                            "train": ref.train.to_dict() if ref.train else None, "results": results})
            first = next((x for x in results if x["nfe"] == min(spec.nfes)), None)
            if first and first["metrics"]:
                curves.append({"label": ref.label, "seed": ref.seed, "step": step, "nfe": min(spec.nfes), "metrics": first["metrics"]})
            if spec.curve:
                for c in ckpt.list_checkpoints(ref.run_dir / "checkpoints"):
                    if c.resolve() == final.resolve():
                        continue
                    load_ema_into(loaded, c)
                    try:
                        res = evaluate_loaded(loaded, [min(spec.nfes)], evaluators, settings, reference, progress,
                                              f"{label}step {checkpoint_step(c)} ")
                    except Exception as exc:  # noqa: BLE001 - as above
                        console.log(f"[red]{ref.label} seed {ref.seed} checkpoint {c.name} failed: {type(exc).__name__}: {exc}")
                        continue
                    curves.append({"label": ref.label, "seed": ref.seed, "step": checkpoint_step(c), "nfe": min(spec.nfes),
                                   "metrics": res[0]["metrics"]})
                load_ema_into(loaded, final)
            if not any(k[0] == ref.label for k in grids):  # one row of previews per objective: its first run
                nrow = loaded.data.spec.num_classes if 0 < loaded.data.spec.num_classes <= 16 else None
                for nfe in spec.nfes:
                    try:
                        imgs = generate(loaded.objective, loaded.sampler, loaded.net, loaded.data, ev["grid"], nfe,
                                        seed=ev["seed"], batch=ev["batch"], device=loaded.device, balanced=True)
                        path = spec.out / "samples" / f"{_file_slug(ref.label)}_nfe{nfe}.png"
                        grids[(ref.label, nfe)] = loaded.data.save_preview(imgs, path, nrow=nrow)
                    except Exception as exc:  # noqa: BLE001 - a missing picture must not lose the numbers
                        console.log(f"[red]preview {ref.label} nfe {nfe} failed: {type(exc).__name__}: {exc}")
            if i == 0:
                proto = protocol(loaded, settings, evaluators, 0, reference)
    curves.sort(key=lambda c: (c["label"], c["seed"], c["step"]))
    return per_run, curves, proto, grids


def _file_slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def summarize(per_run: list[dict], labels: Sequence[str], nfes: Sequence[int]) -> list[dict]:
    """One entry per (objective, NFE): per-seed values, mean and std of every metric and of the training cost."""
    entries = []
    for label in labels:
        runs = [r for r in per_run if r["label"] == label]
        if not runs:
            continue
        for nfe in nfes:
            rows = [next((x for x in r["results"] if x["nfe"] == nfe), {"metrics": {}}) for r in runs]
            names = list(dict.fromkeys(k for row in rows for k in row["metrics"]))  # evaluator order
            metrics = {}
            for k in names:
                values = [row["metrics"].get(k) for row in rows]
                mean, std = _mean_std(values)
                metrics[k] = {"values": values, "mean": mean, "std": std}
            train = {k: [r["train"][k] if r["train"] else None for r in runs]
                     for k in ("steps", "wall_seconds", "ms_per_step", "peak_memory_mb")}
            params = next((r["train"]["num_params"] for r in runs if r["train"] and r["train"].get("num_params")), None)
            entry = {"objective": label, "nfe": int(nfe), "sampler": runs[0]["sampler"], "seeds": [r["seed"] for r in runs],
                     "metrics": metrics, "train": {**train, "num_params": params}, "runs": [r["run"] for r in runs]}
            errors = [row["error"] for row in rows if "error" in row]
            if errors:
                entry["errors"] = errors
            entries.append(entry)
    return entries


# -- outputs ----------------------------------------------------------------------------------------

def title_of(spec: CompareSpec, proto: dict[str, Any], n_seeds: int, from_runs: bool) -> str:
    ref = proto.get("reference", {})
    if from_runs:
        budget = "existing runs"
    elif spec.budget == "equal-time":
        budget = f"equal-time {spec.seconds:.0f} s"
    else:
        budget = f"equal-steps {spec.base.train['steps']}"
    title = (f"{'/'.join(spec.metrics).upper()} on {ref.get('dataset', '?')} {ref.get('split', '')} "
             f"({proto.get('num_samples', '?')} samples vs {ref.get('num', '?')} reference), {proto.get('weights', 'EMA')}, "
             f"{budget}, {n_seeds} seed{'s' if n_seeds != 1 else ''}")
    return title + tools_of(proto)


def tools_of(proto: dict[str, Any]) -> str:
    """", torch-fidelity 0.4.0 (inception-v3-compat, weights 7ff4a85c)": what produced the numbers, from the records."""
    tools = []
    for rec in proto.get("evaluators", {}).values():
        if rec.get("torch_fidelity"):
            w = rec.get("weights")
            wdesc = f", weights {w.get('sha256', '')[:8]}" if isinstance(w, dict) else ""
            tools.append(f"torch-fidelity {rec['torch_fidelity']} ({rec.get('extractor', '?')}{wdesc})")
    return "".join(f", {t}" for t in dict.fromkeys(tools))


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.4g}"
    if n > 1 and std is not None:
        text += f" ± {std:.2g}"
    return text


MAX_TABLE_METRICS = 6  # more columns stop fitting a terminal; compare.json has every metric


def render_table(entries: list[dict], title: str):
    from rich.table import Table

    names = []
    for e in entries:
        for k in e["metrics"]:
            if k not in names and not k.endswith("_std"):
                names.append(k)
    hidden = len(names) - MAX_TABLE_METRICS
    names = names[:MAX_TABLE_METRICS]
    t = Table(title=title, title_justify="left",
              caption=f"{hidden} more metric(s) per entry in compare.json" if hidden > 0 else None)
    t.add_column("objective")
    t.add_column("sampler")
    t.add_column("NFE", justify="right")
    for k in names:
        t.add_column(k, justify="right")
    for col in ("steps", "train s", "ms/step", "peak MB", "params"):
        t.add_column(col, justify="right")
    for e in entries:
        n = len(e["seeds"])
        tr = e["train"]
        steps_mean, _ = _mean_std([s for s in tr["steps"] if s is not None])
        wall, wall_sd = _mean_std(tr["wall_seconds"])
        ms, ms_sd = _mean_std(tr["ms_per_step"])
        peak, _ = _mean_std(tr["peak_memory_mb"])
        cells = [_fmt(e["metrics"][k]["mean"], e["metrics"][k]["std"], n) if k in e["metrics"] else ("error" if e.get("errors") else "-")
                 for k in names]
        t.add_row(e["objective"], e["sampler"]["name"], str(e["nfe"]), *cells,
                  "-" if steps_mean is None else f"{steps_mean:.0f}", _fmt(wall, wall_sd, n), _fmt(ms, ms_sd, n),
                  "-" if peak is None else f"{peak:.0f}", "-" if tr["num_params"] is None else f"{tr['num_params']:,}")
    return t


def headline_metric(entries: list[dict], preferred: str = "fid") -> str | None:
    keys = [k for e in entries for k in e["metrics"]]
    if preferred in keys:
        return preferred
    return next((k for k in keys if not k.endswith("_std")), None)


def write_plots(entries: list[dict], curves: list[dict], grids: dict, labels: Sequence[str], nfes: Sequence[int],
                out: Path, title: str) -> dict[str, str]:
    """grids.png (objectives x NFE previews, from samples/*.png) and metrics.png (metric vs NFE, metric vs step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    if grids:
        rows = [lb for lb in labels if any((lb, n) in grids for n in nfes)]
        fig, axes = plt.subplots(len(rows), len(nfes), figsize=(3.2 * len(nfes), 3.4 * len(rows)), squeeze=False)
        for i, lb in enumerate(rows):
            for j, nfe in enumerate(nfes):
                ax = axes[i][j]
                ax.axis("off")
                if (lb, nfe) in grids:
                    ax.imshow(plt.imread(grids[(lb, nfe)]), interpolation="nearest")
                ax.set_title(f"{lb}, NFE={nfe}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "grids.png", dpi=110)
        plt.close(fig)
        files["grids"] = "grids.png"
    metric = headline_metric(entries)
    if metric is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for li, lb in enumerate(labels):
            colour = colours[li % len(colours)]
            pts = [(e["nfe"], e["metrics"][metric]["mean"], e["metrics"][metric]["std"] or 0.0)
                   for e in entries if e["objective"] == lb and metric in e["metrics"] and e["metrics"][metric]["mean"] is not None]
            if pts:
                xs, ys, es = zip(*pts)
                a1.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=lb, color=colour)
            cs = [c for c in curves if c["label"] == lb and metric in c["metrics"]]
            for seed in sorted({c["seed"] for c in cs}):
                pts2 = sorted((c["step"], c["metrics"][metric]) for c in cs if c["seed"] == seed)
                a2.plot([p[0] for p in pts2], [p[1] for p in pts2], marker="o", color=colour,
                        label=lb if seed == min(c["seed"] for c in cs) else None)
        a1.set_xlabel("NFE")
        a1.set_xticks(list(nfes))
        a1.set_ylabel(metric.upper())
        a1.set_title(f"{metric.upper()} vs NFE (mean ± std over seeds)", fontsize=10)
        a1.legend()
        a2.set_xlabel("training step")
        a2.set_ylabel(metric.upper())
        a2.set_title(f"{metric.upper()} vs training step (NFE={min(nfes)})", fontsize=10)
        if a2.lines:
            a2.legend()
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        files["plot"] = "metrics.png"
    return files


def evaluator_plots(entries: list[dict], evaluators: dict[str, Evaluator], nfes: Sequence[int], out: Path) -> dict[str, str]:
    """Pictures an evaluator draws itself: an optional `plot(results, path)` method receives
    {objective: {metric: mean}} at the smallest NFE (e.g. gmm-exact's flow-map error heat maps)."""
    files: dict[str, str] = {}
    nfe0 = min(nfes)
    results = {e["objective"]: {k: v["mean"] for k, v in e["metrics"].items() if v["mean"] is not None}
               for e in entries if e["nfe"] == nfe0}
    for name, ev in evaluators.items():
        plot = getattr(ev, "plot", None)
        if callable(plot) and results:
            path = plot(results, out / f"{_file_slug(name)}.png")
            if path is not None:
                files[f"plot_{name}"] = Path(path).name
    return files


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic, strict JSON (NaN/inf become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


@dataclass
class CompareResult:
    entries: list[dict]
    title: str
    payload: dict[str, Any]
    files: dict[str, str]


def run_compare(spec: CompareSpec, console: Any, runs: Sequence[Path] = (), registry: Registry | None = None,
                on_stage: Callable[[str], None] | None = None) -> CompareResult:
    """Train (or take `runs`), evaluate, summarise; write compare.json and the PNGs into spec.out."""
    t0 = time.perf_counter()
    # evaluators first: missing weights stop the comparison before any training
    evaluators = build_evaluators(spec.metrics, spec.options, spec.base.eval, registry)
    if len(set(spec.objectives)) != len(spec.objectives):
        raise CompareError(f"objectives named twice: {spec.objectives}")
    spec.out.mkdir(parents=True, exist_ok=True)
    if runs:
        refs = refs_from_folders(runs, registry)
    else:
        if spec.budget not in BUDGETS:
            raise CompareError(f"budget must be one of {BUDGETS}, got {spec.budget!r}")
        if not spec.objectives:
            raise CompareError("name at least one objective to train (or pass --runs)")
        for obj in spec.objectives:  # every recipe must validate before the first one trains
            objective_recipe(spec.base, obj, spec.seeds[0], spec.base.eval["seed"], registry)
        refs = train_all(spec, console, registry)
    labels = list(dict.fromkeys(r.label for r in refs))
    if on_stage:
        on_stage("evaluating")
    per_run, curves, proto, grids = evaluate_all(refs, spec, console, registry, evaluators)
    entries = summarize(per_run, labels, spec.nfes)
    n_seeds = len({r.seed for r in refs}) if not runs else max(sum(1 for r in refs if r.label == lb) for lb in labels)
    title = title_of(spec, proto, n_seeds, bool(runs))
    files = write_plots(entries, curves, grids, labels, spec.nfes, spec.out, title)
    files.update(evaluator_plots(entries, evaluators, spec.nfes, spec.out))
    payload = {
        "title": title,
        "protocol": {
            **{k: v for k, v in proto.items() if k not in ("objective", "sampler")},
            "recipe": spec.base.source if not runs else None,
            "budget": "existing runs" if runs else spec.budget,
            "steps": None if runs else spec.base.train["steps"],
            "seconds": spec.seconds if (not runs and spec.budget == "equal-time") else None,
            "seeds": spec.seeds if not runs else sorted({r.seed for r in refs}),
            "nfe": list(spec.nfes),
            "metrics": list(spec.metrics),
            "objectives": labels,
            "sampler": "each objective's default sampler" if not runs else "each run's own",
            "shared": {k: v for k, v in spec.base.to_dict().items() if k in ("data", "backbone", "train")} if not runs else None,
        },
        "entries": entries,
        "curves": curves,
        "runs": per_run,
        "files": files,
        "wall_seconds": time.perf_counter() - t0,
    }
    write_json(spec.out / "compare.json", payload)
    return CompareResult(entries, title, payload, files)
