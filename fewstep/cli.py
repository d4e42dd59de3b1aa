"""The `fewstep` command line: parse, load the recipe, call the engine. No math here.

This module imports only the standard library, typer, rich, pluggy and fewstep's
light modules, so `fewstep --help`, `fewstep plugins` and `fewstep check` start
fast; torch is imported inside the commands that train or sample.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import cli_bench, cli_eval, errors
from .cli_common import RecipeArg, SetOpt, _fail, _load, console, err, guard_commands, guarded  # noqa: F401
from .registry import get_registry

app = typer.Typer(
    name="fewstep",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Train, sample and fairly compare one-step and few-step generative models.\n\n"
         "First run: [bold]fewstep train recipes/quickstart.toml[/bold]",
)


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
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="fewstep plugins")
    for col in ("kind", "name", "package", "description"):
        table.add_column(col)
    for s in specs:  # descriptions are plain text: "pip install 'fewstep[wandb]'" must not read as markup
        table.add_row(escape(s.kind), escape(s.name), escape(f"{s.package} {s.version}".strip()), escape(s.description))
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
        if res.peak_memory_mb == res.peak_memory_mb:  # CUDA only (NaN on CPU)
            t.add_row("peak memory", f"{res.peak_memory_mb / 1024:.2f} GiB (torch.cuda.max_memory_allocated)")
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
        for n, metrics in res.evaluation.items():  # eval.after_train
            for k, v in metrics.items():
                t.add_row(f"{k} (nfe {n}, {r.eval['num_samples']} samples)", f"{v:.4g}")
        if res.evaluation:
            t.add_row("evaluation", str(run_dir / "eval_after_train.json"))
        console.print(t)


@app.command()
def sample(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="run folder", exists=True, file_okay=False)],
    nfe: Annotated[int, typer.Option(help="network evaluations per sample", min=1)] = 1,
    num: Annotated[int, typer.Option("--num", "-n", help="number of samples (under torchrun write -n: torchrun reads "
                                                        "--num as its own --numa-binding)", min=1)] = 64,
    out: Annotated[Optional[Path], typer.Option(metavar="FILE", help=".png (grid) or .npz (ADM's evaluator input: arr_0 uint8 NHWC, arr_1 labels) "
                                                "\\[default: RUN/samples/sample_nfe<NFE>.png]")] = None,
    seed: Annotated[int, typer.Option(help="noise and label seed", min=0, max=2**32 - 1)] = 0,
    batch: Annotated[int, typer.Option(help="sampling batch size", min=1)] = 256,
    ema: Annotated[int, typer.Option(help="which EMA copy (index into train.ema); -1: raw weights", min=-1)] = 0,
) -> None:
    """Sample from a run's EMA weights: a class-ordered grid (.png), or ADM's evaluator input (.npz: arr_0 uint8 NHWC,
    arr_1 labels uniform at random over the classes, the same noise as `fewstep eval`); under torchrun the .npz
    batches are split over the ranks and rank 0 writes the file.

    Examples:
      fewstep sample runs/x --nfe 2 --num 64
      torchrun --nproc-per-node 8 -m fewstep sample runs/x --nfe 1 -n 50000 --out samples.npz
    """
    from .cli_eval import _dist
    from .images import to_uint8
    from .runs import load_model

    out = out or run / "samples" / f"sample_nfe{nfe}.png"
    is_npz = out.suffix == ".npz"
    dist, device = _dist() if is_npz else (None, "auto")
    loaded = load_model(run, ema_index=ema, device=device)
    from rich.progress import Progress

    if is_npz:
        import numpy as np
        import torch

        from .evaluation import generated_batches

        with Progress(console=err, disable=not dist.is_main) as prog:
            task = prog.add_task(f"sampling nfe={nfe}", total=num)
            parts = [(to_uint8(x).permute(0, 2, 3, 1).contiguous(), y) for x, y in
                     generated_batches(loaded, num, nfe, seed, batch, dist, lambda n: prog.advance(task, n * dist.world),
                                       loaded.recipe.eval["precision"])]
        # rank 0 alone holds the whole set (50,000 x 256 x 256 x 3 bytes = 9.8 GB): the others send and stop
        images = dist.gather(torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.uint8), main_only=True)
        labels = None
        if loaded.data.spec.num_classes > 0:
            labels = dist.gather(torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
                                 main_only=True)
        if not dist.is_main:
            return
        # gather concatenates by rank; put rows back in batch order (rank r holds batches r, r + world, ...)
        order = torch.cat([torch.arange(k * batch, min(num, (k + 1) * batch))
                           for r in range(dist.world) for k in range(r, -(-num // batch), dist.world)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        images = images[inverse]
        arrays = {"arr_0": images.numpy()}
        if labels is not None:
            arrays["arr_1"] = labels[inverse].numpy().astype(np.int64)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **arrays)
    else:
        from .sampling import generate, save_sample_grid

        with Progress(console=err) as prog:
            task = prog.add_task(f"sampling nfe={nfe}", total=num)
            imgs = generate(loaded.objective, loaded.sampler, loaded.net, loaded.data, num, nfe, seed=seed, batch=batch,
                            device=loaded.device, balanced=True, progress=lambda n: prog.advance(task, n))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_sample_grid(loaded.data, imgs, out, objective=loaded.recipe.objective.name, nfe=nfe, step=loaded.step,
                         ema=loaded.ema_label)
    console.print(f"wrote {out}")


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="run folders", exists=True, file_okay=False)],
    metric: Annotated[Optional[list[str]], typer.Option("--metric", "-m", metavar="NAME",
                                                        help="metric to draw (repeatable) \\[default: loss and every "
                                                             "other logged metric]")] = None,
    smooth: Annotated[int, typer.Option(metavar="K", min=1, help="trailing moving average over K logged points")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE.png",
                                                help="picture to write \\[default: RUN/curves.png for one run, "
                                                     "curves.png for several]")] = None,
) -> None:
    """Draw training curves (from metrics.jsonl) of one or several runs: a panel per metric, a line per run,
    labelled by run and objective, log scale where the values span more than a factor of 10.

    Examples:
      fewstep plot runs/quickstart
      fewstep plot runs/soflow runs/meanflow --metric loss --metric fm_mse --smooth 20 --out curves.png
    """
    from .curves import draw_curves, load_curves

    curves = load_curves(runs, metric, smooth)
    out = out or (runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png"))
    draw_curves(curves, out, title=None if smooth == 1 else f"smoothed over {smooth} logged points")
    console.print(f"wrote {out} ({len(curves)} curves)")


def main() -> None:
    reg = get_registry()
    try:
        reg.add_commands(app)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
        err.print("[bold red]error:[/bold red] ", end="")
        err.print(errors.describe(exc), markup=False)
    guard_commands(app)
    app(prog_name="fewstep")


cli_eval.register(app)  # `eval`, `compare`, `stats`
cli_bench.register(app)  # `bench`
guard_commands(app)
