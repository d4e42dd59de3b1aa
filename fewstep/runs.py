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
        """The decay of the loaded EMA copy (None for the raw weights)."""
        decays = self.recipe.train["ema"]
        return decays[self.ema_index] if 0 <= self.ema_index < len(decays) else None


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
