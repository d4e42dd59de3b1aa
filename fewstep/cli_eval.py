"""`fewstep eval` and `fewstep compare`: registered onto the Typer app of ``fewstep.cli``.

Like cli.py, this module imports no torch or torch_fidelity at top level (`fewstep --help` stays
fast); the work happens in ``fewstep.compare``, imported inside the commands.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import SetOpt, _fail, _load, app, console, err
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


@app.command("eval")
def eval_cmd(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="run folder", exists=True, file_okay=False)],
    nfe: NfeOpt = None,
    num: Annotated[Optional[int], typer.Option(metavar="N", min=2, help="generated samples per NFE \\[default: the recipe's eval.num_samples]")] = None,
    metrics: MetricsOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="noise and label seed \\[default: the recipe's eval.seed]", min=0)] = None,
    ema: Annotated[int, typer.Option(help="which EMA copy (index into train.ema); -1: raw weights", min=-1)] = 0,
    ref_split: Annotated[str, typer.Option(help="reference split of the run's data source", rich_help_panel="Evaluators")] = "train",
    ref_num: Annotated[int, typer.Option(metavar="N", min=0, rich_help_panel="Evaluators",
                                         help="reference images (0: as many as generated samples, or all there are)")] = 0,
    option: OptionOpt = None,
    out: Annotated[Optional[Path], typer.Option(metavar="FILE", help="where to write the results \\[default: RUN/eval.json]",
                                                rich_help_panel="Output")] = None,
) -> None:
    """Evaluate a run's EMA weights with torch-fidelity (FID, KID, IS, precision/recall) at each NFE; writes RUN/eval.json.

    Samples use uniform random labels and fixed noise (--seed); images become uint8 as floor(clamp(127.5 x + 128)). Reference statistics are computed once and cached.

    Examples:
      fewstep eval runs/quickstart --nfe 1,2 --num 1000 --metrics fid,kid
      FEWSTEP_INCEPTION_WEIGHTS=~/default_1.pt fewstep eval runs/x
      fewstep eval runs/x --metrics isc -O inception_weights=~/weights-inception-2015-12-05-6726825d.pth
    """
    from .compare import DEFAULT_METRICS, CompareError, EvalSettings, evaluate_run, parse_options, tools_of, write_json
    from .engine.trainer import RunFolderError, load_run_recipe

    try:
        recipe = load_run_recipe(run)
        options = parse_options(option or [])
    except (RunFolderError, RecipeError, RegistryError, CompareError) as exc:
        _fail(str(exc))
    ev = recipe.eval
    nfes = _int_list(nfe, "--nfe") or list(ev["nfe"])
    settings = EvalSettings(metrics=_names(metrics) or list(ev["metrics"]) or list(DEFAULT_METRICS),
                            num=num or ev["num_samples"], seed=ev["seed"] if seed is None else seed, batch=ev["batch"],
                            ref_split=ref_split, ref_num=ref_num)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err) as progress:
            payload = evaluate_run(run, nfes, settings, options, ema_index=ema, progress=progress)
    except (CompareError, RegistryError, RecipeError, OptionError, FileNotFoundError, DataError) as exc:
        _fail(str(exc))
    target = out or run / "eval.json"
    write_json(target, payload)
    from rich.table import Table

    proto = payload["protocol"]
    ref = proto["reference"]
    t = Table(title=f"{run} step {payload['step']}: {settings.num} samples vs {ref['num']} {ref['dataset']} {ref['split']} "
                    f"reference, {proto['weights']}{tools_of(proto)}", title_justify="left")
    results = payload["results"]
    t.add_column("metric")
    for r in results:  # a column per NFE: any number of metrics fits
        t.add_column(f"NFE {r['nfe']}", justify="right")
    for k in dict.fromkeys(k for r in results for k in r["metrics"]):
        t.add_row(k, *[f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "-" for r in results])
    t.add_row("sampling s", *[f"{r['sample_seconds']:.1f}" for r in results], style="dim")
    t.add_row("metrics s", *[f"{r['eval_seconds']:.1f}" for r in results], style="dim")
    console.print(t)
    console.print(f"wrote {target}")


@app.command()
def compare(
    objectives: Annotated[Optional[list[str]], typer.Argument(metavar="OBJ...", help="objectives to train and compare, e.g. soflow meanflow")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", metavar="RECIPE", exists=True, dir_okay=False,
                                                   help="shared recipe; only \\[objective] is swapped \\[default: recipes/compare_digits.toml]")] = None,
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
    num: Annotated[Optional[int], typer.Option(metavar="N", min=2, help="generated samples per evaluation \\[default: the recipe's eval.num_samples]")] = None,
    option: OptionOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="retrain runs that already exist in the comparison folder")] = False,
    curve: Annotated[bool, typer.Option(help="also evaluate intermediate checkpoints (smallest NFE) for the metric-vs-step plot")] = True,
) -> None:
    """Train objectives from one recipe with only \\[objective] swapped, then compare them at each NFE.

    Same backbone, data, data order, seeds and budget; each objective keeps its own defaults and default sampler. Prints a table (metrics mean ± std over seeds, training time, ms/step, peak memory, parameters) and writes OUT/compare.json, OUT/grids.png and OUT/metrics.png.

    Without --recipe it runs recipes/compare_digits.toml: 8x8 digits on CPU in minutes. FID on 8x8 digits is a smoke-level signal; compare on CIFAR-10 (or the GMM data) for conclusions.

    Examples:
      fewstep compare soflow meanflow
      fewstep compare soflow meanflow ect --recipe recipes/cifar10.toml --nfe 1,2 --seeds 3
      fewstep compare soflow meanflow --budget equal-time --seconds 600
      fewstep compare --runs runs/a runs/b --nfe 1,2
    """
    from .compare import BUDGETS, DEFAULT_METRICS, CompareError, CompareSpec, default_recipe, parse_options, run_compare

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
    try:
        options = parse_options(option or [])
    except CompareError as exc:
        _fail(str(exc))
    if run_dirs:
        from .engine.trainer import RunFolderError, load_run_recipe
        from .recipe import recipe_from_dict

        try:
            first = load_run_recipe(run_dirs[0])
            base = first
            if overrides:
                d = first.to_dict()
                from .recipe import parse_override

                for text in overrides:
                    table, key, value = parse_override(text)
                    d.setdefault(table, {})[key] = value
                base = recipe_from_dict(d, first.source)
        except (RunFolderError, RecipeError, RegistryError) as exc:
            _fail(str(exc))
    else:
        path = recipe or default_recipe()
        if path is None:
            _fail("no --recipe given and the default recipes/compare_digits.toml is in neither fewstep's source tree "
                  "nor the working directory; pass --recipe RECIPE")
        base = _load(path, overrides)
    spec = CompareSpec(objectives=objectives, base=base, out=out or Path("runs") / f"compare-{base.name}",
                       nfes=list(base.eval["nfe"]), seeds=[base.train["seed"] + k for k in range(seeds)],
                       metrics=list(base.eval["metrics"]) or list(DEFAULT_METRICS), budget=budget, seconds=seconds,
                       options=options, force=force, curve=curve)
    if run_dirs:
        from .engine.trainer import load_run_recipe

        spec.seeds = sorted({load_run_recipe(d).train["seed"] for d in run_dirs})
    try:
        result = run_compare(spec, err, runs=run_dirs)
    except (CompareError, RegistryError, RecipeError, OptionError, DataError) as exc:
        _fail(str(exc))
    from .compare import render_table

    # outside a terminal (CI logs, files) rich would squeeze the table into 80 columns
    from rich.console import Console

    out_console = console if console.is_terminal else Console(width=max(console.width, 160))
    out_console.print(render_table(result.entries, result.title))
    files = ", ".join(str(spec.out / f) for f in ["compare.json", *result.files.values()])
    console.print(f"wrote {files}")
    console.print(f"total wall time {time.perf_counter() - t0:.1f} s")
