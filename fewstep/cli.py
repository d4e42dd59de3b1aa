"""The `fewstep` command line: parse, load the recipe, call the engine. No math here.

This module imports only the standard library, typer, rich, pluggy and fewstep's
light modules, so `fewstep --help`, `fewstep plugins` and `fewstep check` start
fast; torch is imported inside the commands that train or sample.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import errors
from .recipe import load_recipe
from .registry import get_registry

app = typer.Typer(
    name="fewstep",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Train, sample and fairly compare one-step and few-step generative models.\n\n"
         "First run: [bold]fewstep train recipes/quickstart.toml[/bold]",
)
console = Console()
err = Console(stderr=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="TABLE.KEY=VALUE",
                                                     help="override a recipe value (repeatable), e.g. --set train.steps=500",
                                                     rich_help_panel="Overrides")]
RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe TOML file", exists=True, dir_okay=False)]


def _fail(message: str, code: int = 2) -> None:
    err.print("[bold red]error:[/bold red] ", end="", highlight=False)
    err.print(message, highlight=False, soft_wrap=True, markup=False)  # messages quote [tables]: no markup
    raise typer.Exit(code)


def guarded(fn):
    """Every command's errors in one line: named errors exit 2 (the user's to fix) or 1 (a runtime fault), no
    traceback unless FEWSTEP_DEBUG=1; Ctrl-C exits 130 with a note on how to resume."""
    if getattr(fn, "__fewstep_guarded__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]", highlight=False)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one place exceptions become exit codes
            if getattr(exc, "exit_code", None) is not None and type(exc).__module__.startswith(("click", "typer")):
                raise
            if errors.debug():
                err.print_exception(show_locals=False)
            _fail(errors.describe(exc), errors.exit_code_of(exc))

    wrapper.__fewstep_guarded__ = True
    return wrapper


def guard_commands(typer_app) -> None:
    """Wrap every registered command (built-in or a plugin's, sub-apps included) with :func:`guarded`."""
    for cmd in typer_app.registered_commands:
        if cmd.callback is not None:
            cmd.callback = guarded(cmd.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            guard_commands(group.typer_instance)


def _load(recipe: Path, overrides: list[str] | None):
    return load_recipe(recipe, overrides or [])


@app.command()
def check(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe, build every component, and print the recipe fully resolved. Changes nothing.

    Besides every value, it builds the data source, the objective and the sampler, and the backbone on the meta
    device (no memory, no time), and runs one sample of the data's shape through it: what `train` would report
    before its first step, check reports now.

    Example: fewstep check recipes/quickstart.toml --set train.steps=100
    """
    r = _load(recipe, set_)
    from rich.syntax import Syntax

    from .build import check_components

    facts = check_components(r)
    console.print(Syntax(r.to_toml(), "toml", theme="ansi_dark", background_color="default"))
    err.print(f"[green]ok[/green]: {recipe} is valid; data {facts['shape']} with {facts['classes']} classes, "
              f"backbone {facts['parameters']:,} parameters", highlight=False)


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """List registered plugins: kind, name, package, description, and every plugin that is broken, with why."""
    reg = get_registry()
    specs = reg.all()
    if as_json:
        payload = {"plugins": [s.as_dict() for s in specs],
                   "failures": [{"plugin": f.plugin, "package": f.package, "error": f.error} for f in reg.failures]}
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        return
    from rich.table import Table

    table = Table(title="fewstep plugins")
    for col in ("kind", "name", "package", "description"):
        table.add_column(col)
    for s in specs:
        table.add_row(s.kind, s.name, f"{s.package} {s.version}".strip(), s.description)
    console.print(table)
    for f in reg.failures:
        err.print("[bold red]broken plugin[/bold red] ", end="")
        err.print(str(f), highlight=False, markup=False)


@app.command()
def train(
    recipe: RecipeArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="run folder \\[default: runs/<recipe name>]",
                                                rich_help_panel="Output")] = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in the folder from its last checkpoint")] = False,
    force: Annotated[bool, typer.Option("--force", help="start over in a folder that already holds a run (the old run "
                                                       "is kept until the new one has built and written its first file)")] = False,
) -> None:
    """Train a model from a recipe. Writes recipe.toml, metrics.jsonl, checkpoints/ and samples/ in the run folder.

    SIGTERM or SIGUSR1 (what cluster schedulers send before preemption) writes a checkpoint at the next step
    boundary and exits with 128 + the signal number; --resume then continues bit-identically.

    Examples:
      fewstep train recipes/quickstart.toml
      fewstep train recipes/quickstart.toml --set train.steps=200 --out runs/short
      fewstep train recipes/quickstart.toml --resume
      torchrun --nproc-per-node 2 -m fewstep train recipes/quickstart.toml
    """
    r = _load(recipe, set_)
    run_dir = out or Path("runs") / r.name
    from .engine.trainer import Trainer

    trainer = Trainer(r, run_dir, resume=resume, force=force, console=err)
    res = trainer.run()
    if trainer.info.is_main:
        from rich.table import Table

        t = Table(title=f"run {run_dir}", show_header=False)
        t.add_row("steps", str(res.step))
        t.add_row("wall time", f"{res.wall_seconds:.1f} s")
        t.add_row("ms / step", f"{res.ms_per_step:.1f}")
        t.add_row("parameters", f"{res.num_params:,}")
        t.add_row("skipped steps", str(res.skipped_steps))
        if res.final_metrics_step != res.step:
            t.add_row("metrics", f"from step {res.final_metrics_step} (the steps after it were skipped)")
        if res.headline and res.headline in res.final_metrics:
            t.add_row(f"{res.headline} (headline)", f"{res.final_metrics[res.headline]:.4g}")
        for k, v in res.final_metrics.items():
            if k != res.headline:
                t.add_row(k, f"{v:.4g}")
        for g in res.grids[-len(r.eval["nfe"]):]:
            t.add_row("grid", str(g))
        console.print(t)


@app.command()
def sample(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="run folder", exists=True, file_okay=False)],
    nfe: Annotated[int, typer.Option(help="network evaluations per sample", min=1)] = 1,
    num: Annotated[int, typer.Option(help="number of samples", min=1)] = 64,
    out: Annotated[Optional[Path], typer.Option(metavar="FILE", help=".png (grid) or .npz (uint8 NHWC, key arr_0) "
                                                "\\[default: RUN/samples/sample_nfe<NFE>.png]")] = None,
    seed: Annotated[int, typer.Option(help="noise and label seed", min=0, max=2**32 - 1)] = 0,
    batch: Annotated[int, typer.Option(help="sampling batch size", min=1)] = 256,
    ema: Annotated[int, typer.Option(help="which EMA copy (index into train.ema); -1: raw weights", min=-1)] = 0,
) -> None:
    """Sample from a run's EMA weights (labels uniform at random for .npz, class-ordered for grids)."""
    from .runs import load_model

    loaded = load_model(run, ema_index=ema)
    from .images import to_uint8
    from .sampling import generate

    out = out or run / "samples" / f"sample_nfe{nfe}.png"
    is_npz = out.suffix == ".npz"
    from rich.progress import Progress

    with Progress(console=err) as prog:
        task = prog.add_task(f"sampling nfe={nfe}", total=num)
        imgs = generate(loaded.objective, loaded.sampler, loaded.net, loaded.data, num, nfe, seed=seed, batch=batch,
                        device=loaded.device, balanced=not is_npz, progress=lambda n: prog.advance(task, n))
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_npz:
        import numpy as np

        np.savez(out, arr_0=to_uint8(imgs).permute(0, 2, 3, 1).numpy())
    else:
        nrow = loaded.data.spec.num_classes if 0 < loaded.data.spec.num_classes <= 16 else None
        loaded.data.save_preview(imgs, out, nrow=nrow)
    console.print(f"wrote {out}")


def main() -> None:
    reg = get_registry()
    try:
        reg.add_commands(app)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
        err.print("[bold red]error:[/bold red] ", end="")
        err.print(errors.describe(exc), markup=False)
    guard_commands(app)
    app(prog_name="fewstep")


from . import cli_eval  # noqa: E402,F401  (registers `eval` and `compare` on the app)
from . import cli_bench  # noqa: E402,F401  (registers `bench` on the app)

guard_commands(app)
