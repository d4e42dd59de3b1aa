"""`fewstep import`: official checkpoints -> fewstep run folders (registration only: no torch here).

    fewstep import soflow   SoFlow/XL-2-cond/ckpts/1200000.pt --recipe recipes/soflow_xl2.toml --out runs/soflow_xl2_official
    fewstep import meanflow checkpoint-last.pth --recipe recipes/meanflow_cifar10.toml --out runs/meanflow_cifar10_official

The key mappings (official parameter names <-> fewstep's) are in layouts.py; docs/imagenet.md has the walk-through.
"""
from pathlib import Path
from typing import Annotated, Optional

from fewstep.api import hookimpl


@hookimpl
def register_commands(app):
    import typer

    imp = typer.Typer(name="import", no_args_is_help=True,
                      help="Turn an official checkpoint into a fewstep run folder (then `fewstep sample RUN`, `fewstep eval RUN`).")

    Ckpt = Annotated[Path, typer.Argument(metavar="CKPT", help="the official checkpoint file (read with "
                                          "torch.load(weights_only=True): nothing in it is executed)")]
    Out = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="the run folder to write (must not hold a run)")]
    RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", metavar="RECIPE", help="the recipe the weights were "
                                             "trained with, e.g. recipes/soflow_xl2.toml: its [backbone] must fit them")]
    SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="TABLE.KEY=VALUE",
                                                         help="override a recipe value (repeatable), e.g. data.root=DIR")]
    StepOpt = Annotated[Optional[int], typer.Option("--step", min=0, metavar="N", help="the training step to record "
                                                    "\\[default: from the checkpoint (its name, or its counters)]")]

    @imp.command("soflow")
    def import_soflow(ckpt: Ckpt, out: Out, recipe: RecipeOpt, set_: SetOpt = None, step: StepOpt = None) -> None:
        """zlab-princeton/SoFlow checkpoints (ckpts/<step>.pt: {'model', 'ema_model', 'optimizer'}), DiT or U-Net.

        The EMA weights ('ema_model') become the run's EMA copies, 'model' its raw weights.

        Example:
          fewstep import soflow SoFlow/XL-2-cond/ckpts/1200000.pt --recipe recipes/soflow_xl2.toml \\
              --set data.root=/data/imagenet256-latents --out runs/soflow_xl2_official
        """
        from .command import run_import

        run_import("soflow", ckpt, out, recipe, set_ or [], step)

    @imp.command("meanflow")
    def import_meanflow(ckpt: Ckpt, out: Out, recipe: RecipeOpt, set_: SetOpt = None, step: StepOpt = None) -> None:
        """Gsunshine/py-meanflow checkpoints (checkpoint-*.pth: {'model': net, net_ema, net_ema1, ...}), the U-Net.

        net_ema, net_ema1, net_ema2 become EMA copies 0, 1, 2 (recipes/meanflow_cifar10.toml lists the same three
        decays), net the raw weights. The ImageNet MeanFlow weights are JAX (Gsunshine/meanflow): not read here.

        Example:
          fewstep import meanflow checkpoint-last.pth --recipe recipes/meanflow_cifar10.toml \\
              --set data.root=/data/cifar10 --out runs/meanflow_cifar10_official
        """
        from .command import run_import

        run_import("meanflow", ckpt, out, recipe, set_ or [], step)

    app.add_typer(imp, name="import")
