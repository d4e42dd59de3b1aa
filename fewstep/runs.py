"""Load a finished (or running) run folder: recipe, components and EMA weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .build import build_components
from .engine import checkpoint as ckpt
from .engine.distributed import resolve_device
from .engine.trainer import load_run_recipe
from .errors import RunFolderError
from .interfaces import DataSource, Objective, Sampler
from .recipe import Recipe


@dataclass
class LoadedRun:
    recipe: Recipe
    net: torch.nn.Module
    objective: Objective
    sampler: Sampler
    data: DataSource
    device: torch.device
    checkpoint: Path
    ema_index: int = 0  # the EMA copy in `net` (-1: the raw weights)

    @property
    def step(self) -> int | None:
        """The training step of the loaded checkpoint."""
        return ckpt.checkpoint_step(self.checkpoint)

    @property
    def ema_decay(self) -> float | None:
        """The constant decay of the loaded EMA copy (None for the raw weights and for a half-life copy)."""
        i = self.ema_index - len(self.recipe.train.get("ema_halflife_kimg", []))
        decays = self.recipe.train["ema"]
        return decays[i] if self.ema_index >= 0 and 0 <= i < len(decays) else None

    @property
    def ema_label(self) -> str | None:
        """What the loaded EMA copy is ('0.9999', '500 kimg half-life (ramp-up 0.05)'; None for the raw weights)."""
        from .engine.ema import ema_labels

        labels = ema_labels(self.recipe.train)
        return labels[self.ema_index] if 0 <= self.ema_index < len(labels) else None


def load_model(run_dir: str | Path, ema_index: int = 0, device: str = "auto", registry: Any = None) -> LoadedRun:
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, registry)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise RunFolderError(f"{run_dir} has no checkpoint yet (its training has not written one); wait for the first "
                             f"checkpoint, or resume the run")
    dev = resolve_device(device)
    comps = build_components(recipe, device=dev, registry=registry)
    if ema_index < 0:
        state = ckpt.load_weights(latest / "model.safetensors", dev)
    else:
        state = ckpt.load_ema_weights(latest, ema_index, dev)
    ckpt.load_into(comps.net, state, latest / ("model.safetensors" if ema_index < 0 else "ema.safetensors"))
    comps.net.eval()
    return LoadedRun(recipe, comps.net, comps.objective, comps.sampler, comps.data, dev, latest, ema_index)


def write_run(recipe: Recipe, run_dir: str | Path, model: dict[str, torch.Tensor],
              ema: list[dict[str, torch.Tensor]] | None = None, *, step: int = 0, source: str = "",
              registry: Any = None) -> Path:
    """A run folder from weights made elsewhere (an imported official checkpoint): recipe.toml and one checkpoint.

    `model` becomes the raw weights, `ema[i]` EMA copy i of `recipe.train["ema"]` (a recipe with more copies than
    given repeats the last; none given: the raw weights). Every state dict must fit the recipe's backbone exactly:
    missing, unexpected and wrongly shaped keys are one CheckpointError naming them (`source` is the file they came
    from). The optimizer state is fresh (a `--resume` continues with new moments). Refuses a folder that holds a run.
    Returns the checkpoint folder; `fewstep sample RUN` and `fewstep eval RUN` read the run like a trained one.
    """
    from .engine.ema import ema_from_train
    from .engine.trainer import make_optimizer

    run_dir = Path(run_dir)
    if (run_dir / "recipe.toml").exists() or ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
        raise RunFolderError(f"--out {run_dir} already holds a run; choose another folder")
    comps = build_components(recipe, device=torch.device("cpu"), registry=registry)
    net = comps.net
    where = Path(source or "the imported weights")
    ckpt.load_into(net, model, where)
    copies = ema_from_train(net, recipe.train)
    given = list(ema or [model])
    for i, shadow in enumerate(copies.shadows):
        state = given[min(i, len(given) - 1)]
        ckpt.load_into(net, state, Path(f"{where} (EMA copy {i})"))  # names what does not fit
        for k in shadow:
            shadow[k].copy_(state[k].float())
    ckpt.load_into(net, model, where)  # the raw weights stay in the module that is saved
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], recipe.train, torch.device("cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe.to_toml())
    return ckpt.save_checkpoint(run_dir / "checkpoints", step, net, copies, opt,
                                {"skipped_steps": 0, "recipe": recipe.name, "imported_from": str(source)},
                                keep=recipe.train["keep_checkpoints"])
