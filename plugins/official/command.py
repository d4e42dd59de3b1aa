"""`fewstep import soflow|meanflow CKPT --recipe R --out RUN`: read, map, check, write the run folder."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from fewstep.api import CheckpointError, load_recipe, write_run

from . import layouts as L


def read_checkpoint(path: Path) -> dict:
    """torch.load(weights_only=True): tensors, numbers, strings and containers only, no code runs. py-meanflow
    also stores its argparse.Namespace of options, allowed as a plain attribute bag."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a torch file, a pickle that needs other classes, truncated
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read as a checkpoint without running code from it "
                              f"({type(exc).__name__}: {msg[:200]}); nothing in it was executed") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def _tensors(obj, key: str, path: Path) -> dict[str, torch.Tensor]:
    sd = obj.get(key)
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path} has no state dict under {key!r} (keys: {', '.join(map(str, obj)) or 'none'}); "
                              f"is it a checkpoint of that code?")
    return sd


def run_import(kind: str, ckpt: Path, out: Path, recipe_path: Path, overrides: list[str], step: int | None) -> None:
    from rich.console import Console

    recipe = load_recipe(recipe_path, overrides)
    obj = read_checkpoint(ckpt)
    what = str(ckpt)
    if kind == "soflow":
        # dit.py's LabelEmbedder has the null row exactly when the model was trained with label dropout
        null_row = recipe.objective.options.get("cfg_drop", 0.1) > 0
        model = L.soflow_to_fewstep(_tensors(obj, "model", ckpt), null_row, what)
        emas = [L.soflow_to_fewstep(_tensors(obj, "ema_model", ckpt), null_row, what + " (ema_model)")] \
            if "ema_model" in obj else []
        if step is None:
            m = re.fullmatch(r"(\d+)", ckpt.stem)
            step = int(m.group(1)) if m else 0
    else:
        model, emas, updates = L.meanflow_to_fewstep(_tensors(obj, "model", ckpt), what)
        if step is None:
            step = updates or 0
    done = write_run(recipe, out, model, emas, step=step, source=what)
    Console(stderr=True).print(f"wrote {done} ({len(model)} tensors, {len(emas)} EMA cop{'y' if len(emas) == 1 else 'ies'}, "
                               f"step {step}); next: fewstep sample {out} --nfe 1, fewstep eval {out}", highlight=False)

