"""`fewstep bench`: registered onto the Typer app of ``fewstep.cli`` (no torch at import; the work is in bench.py)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_common import SetOpt, _load, console, err


def _default_recipe() -> Path:
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        p = root / "recipes" / "quickstart.toml"
        if p.is_file():
            return p
    from .errors import UserError

    raise UserError("fewstep bench: no --recipe given and no recipes/quickstart.toml here; pass --recipe RECIPE")


def bench(
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", metavar="RECIPE", exists=True, dir_okay=False,
                                                   help="recipe whose data, backbone and train settings are used; only "
                                                        "\\[objective] is swapped \\[default: recipes/quickstart.toml]")] = None,
    objectives: Annotated[str, typer.Option(metavar="LIST", help="comma-separated objectives, each name[:key=value...], "
                                            "e.g. fm,soflow,meanflow:jvp_mode=single,ect")] = "fm,soflow,meanflow,ect",
    batch: Annotated[Optional[int], typer.Option(metavar="B", min=1, help="batch size \\[default: the recipe's train.batch]")] = None,
    steps: Annotated[int, typer.Option(metavar="N", min=1, help="timed steps (the median is reported)")] = 20,
    warmup: Annotated[int, typer.Option(metavar="N", min=0, help="untimed steps first (new shapes, compilation, "
                                        "autotuning)")] = 30,
    compile: Annotated[Optional[bool], typer.Option("--compile/--eager", help="torch.compile the backbone (as "
                                                    "train.compile) \\[default: the recipe's train.compile]")] = None,
    train_step: Annotated[bool, typer.Option("--train-step/--no-train-step", help="also time the full `fewstep train` "
                                             "step (real data source, EMA, loggers) beside the bare step")] = True,
    sampling: Annotated[bool, typer.Option("--sampling", help="time sampling instead: 1- and 2-NFE images/s (latent "
                                           "recipes decode with their VAE) and the FID feature extractor")] = False,
    nfe: Annotated[str, typer.Option(metavar="LIST", help="--sampling: NFEs to time")] = "1,2",
    sample_batch: Annotated[int, typer.Option(metavar="B", min=0, help="--sampling: batch \\[default: the recipe's "
                                              "eval.batch]")] = 0,
    fid: Annotated[bool, typer.Option("--fid/--no-fid", help="--sampling: also time the FID feature extractor")] = True,
    fid_num: Annotated[int, typer.Option(metavar="N", min=0, help="--sampling: images in the timed FID feature pass "
                                         "\\[default: 4x the sampling batch]")] = 0,
    profile: Annotated[Optional[Path], typer.Option("--profile", metavar="DIR", file_okay=False,
                                                    help="also profile 3 steps per objective with torch.profiler: a "
                                                         "table of where a step goes (matrix kernels, attention, "
                                                         "other, idle) and a Chrome trace per objective in DIR")] = None,
    set_: SetOpt = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", metavar="PATH", help="also write the report as JSON",
                                                      rich_help_panel="Output")] = None,
) -> None:
    """Time each objective's training step on one backbone and batch: ms/step, images/s, peak memory, FLOPs,
    TFLOP/s and share of the measured matmul rate, time relative to fm, and the full `fewstep train` step.

    Examples:
      fewstep bench
      fewstep bench --recipe recipes/bench_latents_b2.toml --compile --json bench.json
      fewstep bench --recipe recipes/bench_latents_b2.toml --objectives fm,meanflow:jvp_mode=single --steps 10
      fewstep bench --recipe recipes/bench_latents_xl2.toml --sampling --objectives soflow
    """
    from .bench import render, run_bench, write_json
    from .cli_eval import _int_list

    r = _load(recipe or _default_recipe(), set_)
    report = run_bench(r, objectives=objectives, batch=batch, steps=steps, warmup=warmup, compile=compile,
                       train_step=train_step, sampling=sampling, nfes=_int_list(nfe, "--nfe"), sample_batch=sample_batch,
                       fid=fid, fid_num=fid_num, console=err, progress=lambda m: err.log(m),
                       profile=profile)
    argv = sys.argv[1:]
    if "bench" not in argv:  # called in-process (tests, CliRunner): the command from the parsed options
        given = {"recipe": recipe, "objectives": objectives, "batch": batch, "steps": steps, "warmup": warmup,
                 "compile": compile, "sampling": sampling, "nfe": nfe if sampling else None}
        argv = ["bench", *(f"--{k}" if v is True else f"--{k}={v}" for k, v in given.items()
                           if v not in (None, False))]
        argv += [f"--set={s}" for s in (set_ or [])]
    report.command = " ".join(["fewstep", *argv])
    console.print(render(report))
    for note in report.notes:
        err.print(note, highlight=False, markup=False)
    if json_path is not None:
        write_json(report, json_path)
        err.print(f"wrote {json_path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `bench` to the app (fewstep.cli calls this; guard_commands wraps it)."""
    app.command()(bench)
