"""Checkpoints: safetensors for weights and EMA, a weights-only torch file for optimizer and RNG.

Each checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` written under a
temporary name and renamed into place, then ``checkpoints/latest`` is replaced
atomically: a crash at any moment leaves the previous checkpoint intact and
``latest`` always names a complete one. Loading never unpickles arbitrary
objects (safetensors, and ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_py_state_to_list(random.getstate()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_list(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in d.items()}


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, ema: Any, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    save_file(_contiguous(ema.state_dict()), str(tmp / "ema.safetensors"),
              metadata={"step": str(step), "decays": json.dumps(ema.decays), "every": str(ema.every)})
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), "step": step}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}, indent=2, default=str))
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, final.name + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its meta.json exists)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "meta.json").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "meta.json").is_file():
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def load_ema_weights(ckpt: Path, index: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of EMA copy `index` (train.ema[index]) of checkpoint folder `ckpt`."""
    prefix = f"ema{index}."
    flat = load_weights(ckpt / "ema.safetensors", device)
    state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if not state:
        raise FileNotFoundError(f"{ckpt} has no EMA copy {index}")
    return state


def load_run_ema(path: str | Path, index: int = 0, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], Path]:
    """EMA copy `index` of a run folder's latest checkpoint, or of a checkpoint folder: (state dict, checkpoint).

    Raises FileNotFoundError naming `path` when it is neither (or holds no such EMA copy).
    """
    path = Path(path)
    found = path if (path / "ema.safetensors").is_file() else latest_checkpoint(path / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{path} is neither a fewstep run folder with a checkpoint nor a checkpoint folder "
                                f"holding ema.safetensors")
    return load_ema_weights(found, index, device), found


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
