"""`fewstep eval`, `fewstep compare` and `fewstep stats`, added to the app by :func:`register`.

Like cli.py, this module imports no torch or torch_fidelity at top level (`fewstep --help` stays
fast); the work happens in ``fewstep.evaluation`` (the protocol), ``fewstep.comparison`` (train and
summarise) and ``fewstep.report`` (tables, plots, JSON), imported inside the commands.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_common import SetOpt, _fail, _load, console, err
from .interfaces import DataError
from .options import OptionError
from .recipe import RecipeError
from .registry import RegistryError

OptionOpt = Annotated[Optional[list[str]], typer.Option(
    "--option", "-O", metavar="KEY=VALUE", rich_help_panel="Evaluators",
    help="evaluator option, given to every requested evaluator that declares KEY (repeatable), "
         "e.g. -O inception_weights=/path/default_1.pt or -O feature_extractor=fewstep-pool48")]
MetricsOpt = Annotated[Optional[str], typer.Option(
    metavar="LIST", rich_help_panel="Evaluators",
    help="comma-separated evaluator names \\[default: the recipe's eval.metrics, else fid,kid]")]
NfeOpt = Annotated[Optional[str], typer.Option(metavar="LIST", help="comma-separated NFEs, e.g. 1,2 \\[default: the recipe's eval.nfe]")]


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        _fail(f"{what} must be comma-separated integers, e.g. 1,2; got {text!r}")
    if not values or min(values) < 1:
        _fail(f"{what} needs positive integers; got {text!r}")
    return values


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [v.strip() for v in text.split(",") if v.strip()]
    return names or None


ReferenceOpt = Annotated[Optional[Path], typer.Option(
    "--reference", metavar="FILE.npz", exists=True, dir_okay=False, rich_help_panel="Evaluators",
    help="stored reference statistics (mu, sigma: pytorch-fid's or ADM's .npz, or `fewstep stats`) for the streaming "
         "evaluators, instead of the data source's images")]


def _dist(device: str = "auto"):
    """Under torchrun: join the process group; the evaluation shards sampling and features over the ranks."""
    import os

    from .evaluation import Dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .engine.distributed import init_distributed

        info = init_distributed(device)
        return Dist(info.rank, info.world), f"{info.device.type}:{info.device.index}" if info.device.type == "cuda" else "cpu"
    return Dist(), device


def eval_cmd(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="run folder", exists=True, file_okay=False)],
    nfe: NfeOpt = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", metavar="N", min=2, help="generated samples per NFE (under torchrun write -n: "
                                               "torchrun reads --num as its own --numa-binding) \\[default: the recipe's eval.num_samples]")] = None,
    metrics: MetricsOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="noise and label seed \\[default: the recipe's eval.seed]", min=0)] = None,
    ema: Annotated[int, typer.Option(help="which EMA copy (index into train.ema); -1: raw weights", min=-1)] = 0,
    ref_split: Annotated[str, typer.Option(help="reference split of the run's data source", rich_help_panel="Evaluators")] = "train",
    ref_num: Annotated[int, typer.Option(metavar="N", min=0, rich_help_panel="Evaluators",
                                         help="reference images (0: as many as generated samples, or all there are)")] = 0,
    reference: ReferenceOpt = None,
    option: OptionOpt = None,
    precision: Annotated[Optional[str], typer.Option(metavar="fp32|tf32|bf16", help="the network's arithmetic while "
                                                     "sampling \\[default: the recipe's eval.precision, fp32]")] = None,
    out: Annotated[Optional[Path], typer.Option(metavar="FILE", help="where to write the results \\[default: RUN/eval.json]",
                                                rich_help_panel="Output")] = None,
) -> None:
    """Evaluate a run's EMA weights at each NFE (the recipe's eval.metrics, else the default evaluators); writes RUN/eval.json.

    Samples use uniform random labels and fixed noise (--seed); images become uint8 as floor(clamp(127.5 x + 128)). Streaming evaluators take the images batch by batch; under torchrun, sampling and features are split over the ranks and combined on rank 0.

    Examples:
      fewstep eval runs/quickstart --nfe 1,2 --num 1000
      fewstep eval runs/x --num 50000 --reference stats/cifar10-train.npz
      torchrun --nproc-per-node 8 -m fewstep eval runs/x -n 50000
    """
    from .engine.trainer import load_run_recipe
    from .evaluation import EvalSettings, default_metrics, evaluate_run, parse_options
    from .report import render_eval_table, write_json

    recipe = load_run_recipe(run)
    options = parse_options(option or [])
    ev = recipe.eval
    nfes = _int_list(nfe, "--nfe") or list(ev["nfe"])
    settings = EvalSettings(metrics=_names(metrics) or list(ev["metrics"]) or default_metrics(),
                            num=num or ev["num_samples"], seed=ev["seed"] if seed is None else seed, batch=ev["batch"],
                            ref_split=ref_split, ref_num=ref_num, reference=reference,
                            precision=precision or ev.get("precision", "fp32"))
    if settings.precision not in ("fp32", "tf32", "bf16"):
        _fail(f"--precision must be fp32, tf32 or bf16; got {precision!r}")
    dist, device = _dist()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=not dist.is_main) as progress:
        result = evaluate_run(run, nfes, settings, options, ema_index=ema, progress=progress, dist=dist, device=device)
    if not dist.is_main:
        return
    payload = result.to_dict()
    target = out or run / "eval.json"
    write_json(target, payload)
    console.print(render_eval_table(payload, run, settings.num))
    console.print(f"wrote {target}")


def compare(
    objectives: Annotated[Optional[list[str]], typer.Argument(metavar="OBJ...", help="objectives to train and compare, e.g. soflow meanflow")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", metavar="RECIPE", exists=True, dir_okay=False,
                                                   help="shared recipe; only \\[objective] is swapped \\[default: the recipe a dataset plugin names, recipes/compare_digits.toml]")] = None,
    steps: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="training steps per run (equal-steps budget) \\[default: the recipe's]")] = None,
    nfe: NfeOpt = None,
    seeds: Annotated[int, typer.Option(metavar="K", min=1, help="training seeds per objective (train.seed, +1, ...); mean ± std over them")] = 1,
    budget: Annotated[str, typer.Option(metavar="BUDGET", help="equal-steps: same steps for all; equal-time: same training seconds")] = "equal-steps",
    seconds: Annotated[float, typer.Option(metavar="SECONDS", min=0, help="equal-time budget per run (0: the time the first objective takes for its steps)")] = 0.0,
    runs: Annotated[Optional[list[Path]], typer.Option("--runs", metavar="DIR", exists=True, file_okay=False,
                                                       help="compare existing run folders instead of training (repeatable; "
                                                            "further folders may follow as arguments)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", rich_help_panel="Output",
                                                help="comparison folder: runs, compare.json, grids.png, metrics.png \\[default: runs/compare-<recipe name>]")] = None,
    metrics: MetricsOpt = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", metavar="N", min=2, help="generated samples per evaluation (under torchrun "
                                               "write -n: torchrun reads --num as its own --numa-binding) \\[default: the recipe's eval.num_samples]")] = None,
    reference: ReferenceOpt = None,
    option: OptionOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="retrain runs that already exist in the comparison folder "
                                                       "(without it, finished runs are reused and interrupted ones resume)")] = False,
    curve: Annotated[bool, typer.Option(help="also evaluate intermediate checkpoints (smallest NFE) for the metric-vs-step plot")] = True,
) -> None:
    """Train objectives from one recipe with only \\[objective] swapped, then compare them at each NFE.

    Same backbone, data, data order, seeds and budget; each objective keeps its own defaults and default sampler. Prints a table (metrics mean ± std over seeds, training time, ms/step, peak memory, parameters) and writes OUT/compare.json, OUT/grids.png and OUT/metrics.png. Called again on the same --out, it reuses finished runs and resumes interrupted ones from their checkpoints.

    Under torchrun the runs train with DDP and every evaluation is split over the ranks (rank 0 writes the report); --budget equal-time needs one process.

    Without --recipe it runs the recipe a dataset plugin names for it (the digits plugin: recipes/compare_digits.toml, 8x8 digits on CPU in minutes). FID on 8x8 digits is a smoke-level signal; compare on CIFAR-10 (or the GMM data) for conclusions.

    Examples:
      fewstep compare soflow meanflow
      fewstep compare soflow meanflow ect --recipe my_cifar10.toml --nfe 1,2 --seeds 3
      fewstep compare soflow meanflow --budget equal-time --seconds 600
      fewstep compare --runs runs/a runs/b --nfe 1,2
      torchrun --nproc-per-node 8 -m fewstep compare --runs runs/a runs/b -n 50000 --reference in256.npz
    """
    from .comparison import BUDGETS, CompareSpec, default_recipe, run_compare
    from .evaluation import parse_options
    from .report import render_table, write_compare_report

    t0 = time.perf_counter()
    objectives = list(objectives or [])
    run_dirs = list(runs or [])
    if run_dirs:  # `--runs a b c`: the extra folders arrive as positional arguments
        extra = [Path(o) for o in objectives if Path(o).is_dir()]
        if len(extra) != len(objectives):
            _fail("with --runs, the other arguments must be run folders, not objectives: "
                  + ", ".join(o for o in objectives if not Path(o).is_dir()))
        run_dirs += extra
        objectives = []
    if budget not in BUDGETS:
        _fail(f"--budget must be one of {', '.join(BUDGETS)}; got {budget!r}")
    overrides = list(set_ or [])
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    nfes = _int_list(nfe, "--nfe")
    if nfes is not None:
        overrides.append(f"eval.nfe={nfes}")
    if num is not None:
        overrides.append(f"eval.num_samples={num}")
    metric_names = _names(metrics)
    if metric_names is not None:
        overrides.append("eval.metrics=[" + ", ".join(f'"{m}"' for m in metric_names) + "]")
    options = parse_options(option or [])
    if run_dirs:
        from .engine.trainer import load_run_recipe
        from .recipe import parse_override, recipe_from_dict

        first = load_run_recipe(run_dirs[0])
        base = first
        if overrides:
            d = first.to_dict()
            for text in overrides:
                table, key, value = parse_override(text)
                d.setdefault(table, {})[key] = value
            base = recipe_from_dict(d, first.source)
    else:
        path = recipe or default_recipe()
        if path is None:
            _fail("no --recipe given and no installed dataset plugin names a default comparison recipe found in "
                  "recipes/ (of fewstep's source tree or the working directory); pass --recipe RECIPE")
        base = _load(path, overrides)
    spec = CompareSpec(objectives=objectives, base=base, out=out or Path("runs") / f"compare-{base.name}",
                       nfes=list(base.eval["nfe"]), seeds=[base.train["seed"] + k for k in range(seeds)],
                       metrics=list(base.eval["metrics"]), budget=budget, seconds=seconds,
                       options=options, force=force, curve=curve, reference=reference)
    if run_dirs:
        from .engine.trainer import load_run_recipe

        spec.seeds = sorted({load_run_recipe(d).train["seed"] for d in run_dirs})
    dist, device = _dist()
    from rich.console import Console

    log = err if dist.is_main else Console(stderr=True, quiet=True)  # one rank speaks
    comparison = run_compare(spec, log, runs=run_dirs, dist=dist, device=device)
    if not dist.is_main:
        return
    title, files = write_compare_report(comparison, err)
    # outside a terminal (CI logs, files) rich would squeeze the table into 80 columns
    out_console = console if console.is_terminal else Console(width=max(console.width, 160))
    out_console.print(render_table([e.to_dict() for e in comparison.entries], title))
    written = ", ".join(str(spec.out / f) for f in ["compare.json", *files.values()])
    console.print(f"wrote {written}")
    console.print(f"total wall time {time.perf_counter() - t0:.1f} s")


def stats(
    data: Annotated[str, typer.Option(metavar="RECIPE|NAME[:ROOT]", help="a recipe (its \\[data] table) or a dataset "
                                      "plugin, e.g. cifar10:/data/cifar10 (ROOT sets its root option)")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE.npz", help="where to write mu and sigma")],
    split: Annotated[str, typer.Option(help="which split of the data source")] = "train",
    num: Annotated[int, typer.Option("--num", "-n", metavar="N", min=0, help="use the first N images (0: all; under torchrun write -n: "
                                                                   "torchrun reads --num as its own --numa-binding)")] = 0,
    skip: Annotated[int, typer.Option("--skip", metavar="K", min=0, help="leave out the first K images of the same "
                                      "fixed order (with --num N: images K .. K+N-1), e.g. the second half of a split")] = 0,
    batch: Annotated[int, typer.Option(metavar="B", min=1, help="images per batch")] = 256,
    metric: Annotated[Optional[str], typer.Option(metavar="NAME", help="the evaluator that writes statistics "
                                                  "\\[default: the first default evaluator that can]")] = None,
    data_option: Annotated[Optional[list[str]], typer.Option("--data-option", "-D", metavar="KEY=VALUE",
                                                             help="dataset option (repeatable), e.g. -D conditional=false")] = None,
    option: OptionOpt = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", metavar="FILE.npz", exists=True, dir_okay=False,
                                                      help="also score this split against stored statistics (e.g. "
                                                           "CIFAR-10 test against train): the metric and images/s")] = None,
    set_: SetOpt = None,
) -> None:
    """Reference statistics of a dataset split, computed once, stored as .npz (keys mu, sigma: pytorch-fid's and ADM's layout).

    Images go through the feature extractor batch by batch; under torchrun the batches are split over the ranks and rank 0 writes the file. Give the file to eval and compare with --reference.

    Examples:
      fewstep stats --data cifar10:/data/cifar10 --split train --out stats/cifar10-train.npz
      fewstep stats --data recipes/my_imagenet.toml --out stats/in256.npz
      torchrun --nproc-per-node 8 -m fewstep stats --data imagefolder:/data/imagenet/train -D resolution=256 --out in256.npz
      fewstep stats --data cifar10:/data/cifar10 --split test --out test.npz --reference stats/cifar10-train.npz
      fewstep stats --data cifar10:/data/cifar10 -n 25000 --out h1.npz   # two halves of train, one scored against the other:
      fewstep stats --data cifar10:/data/cifar10 -n 25000 --skip 25000 --out h2.npz --reference h1.npz
    """
    import time

    from .evaluation import EvaluationError, Reference, build_evaluators, default_metrics, parse_options
    from .interfaces import BuildContext
    from .registry import get_registry

    reg = get_registry()
    options = parse_options(option or [])
    if Path(data).suffix == ".toml" and Path(data).is_file():
        from .build import build_one

        recipe = _load(Path(data), set_)
        source, name = build_one(reg, recipe, "data", BuildContext(seed=recipe.train["seed"])), recipe.data.name
    else:
        name, _, root = data.partition(":")
        spec = reg.get("dataset", name)
        given = parse_options(data_option or [])
        if root:
            given["root"] = root
        from .options import OptionError

        try:
            source = spec.build(BuildContext(), **spec.options.resolve(given))
        except OptionError as exc:
            _fail(f"--data {data}: {exc}")
    candidates = [metric] if metric else default_metrics(reg)
    evaluators = build_evaluators(candidates, options, None, reg)
    wname, writer = next(((k, e) for k, e in evaluators.items() if callable(getattr(e, "write_statistics", None))),
                         (None, None))
    if writer is None:
        raise EvaluationError(f"none of the evaluators {candidates} can write reference statistics; name one with --metric")
    dist, _ = _dist()
    stream = Reference(source, source.spec.name or name, split, num, skip=skip).stream(batch, dist, None)
    from rich.progress import Progress

    with Progress(console=err, disable=not dist.is_main) as prog:
        task = prog.add_task(f"features of {name} {split}", total=num or None)
        t0 = time.perf_counter()
        record = writer.write_statistics(stream, out, progress=lambda k: prog.advance(task, k) if dist.is_main else None)
        took = time.perf_counter() - t0
    n = record.get("num", 0)
    if dist.is_main:
        part = f" after the first {skip}" if skip else ""
        console.print(f"wrote {out} ({n} images of {name} {split}{part}, {record.get('features', '?')}-d features; "
                      f"{took:.1f} s, {n / max(took, 1e-9):,.0f} images/s end to end)", highlight=False)
    if reference is None:
        return
    if not callable(getattr(writer, "evaluate_stream", None)):
        raise EvaluationError(f"evaluator {wname!r} cannot score a stream against stored statistics")
    gen = Reference(source, source.spec.name or name, split, num, skip=skip).stream(batch, dist, None)
    ref = Reference(None, reference.stem, "stored statistics", 0, statistics=reference).stream(batch, dist, None)
    with Progress(console=err, disable=not dist.is_main) as prog:
        task = prog.add_task(f"{name} {split} against {reference.name}", total=num or None)
        t0 = time.perf_counter()
        scores = writer.evaluate_stream(gen, ref, shared={}, reference_name=reference.stem, reference_split="",
                                        progress=lambda k: prog.advance(task, k) if dist.is_main else None)
        took = time.perf_counter() - t0
    if dist.is_main:
        for key, value in scores.items():
            console.print(f"{key}({name} {split}, {n} images; {reference}) = {value:.4f}  "
                          f"({took:.1f} s, {n / max(took, 1e-9):,.0f} images/s)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `eval`, `compare` and `stats` to the app (fewstep.cli calls this; guard_commands wraps them)."""
    app.command("eval")(eval_cmd)
    app.command()(compare)
    app.command()(stats)
