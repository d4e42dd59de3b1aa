"""Checkpoints: safetensors for weights and EMA, a weights-only torch file for optimizer and RNG.

Each checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` (``step_XXXXXXXX.K`` when step XXXXXXXX is saved
again, K = 1, 2, ...) written under a temporary name, fsynced and renamed into place; then the pointer
``checkpoints/latest`` is replaced atomically, and only then are older folders pruned. A crash at any moment
leaves the newest complete checkpoint loadable: no folder that `latest` may name is ever deleted or renamed
before the pointer has moved on. Leftover ``.tmp-*`` folders of a killed write are removed by
:func:`clean_leftovers` at the next start. Loading never unpickles arbitrary objects (safetensors, and
``torch.load(weights_only=True)``); a file that cannot be read is a :class:`CheckpointError` naming it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

LATEST = "latest"
_NAME = re.compile(r"step_(\d{8,})(?:\.(\d+))?")


def _order(p: Path) -> tuple[int, int]:
    m = _NAME.fullmatch(p.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


def checkpoint_step(ckpt: Path) -> int | None:
    """The training step of a checkpoint folder (step_XXXXXXXX or step_XXXXXXXX.K), None for another name."""
    m = _NAME.fullmatch(Path(ckpt).name)
    return int(m.group(1)) if m else None


def _new_step_dir(root: Path, step: int) -> Path:
    """step_XXXXXXXX, or step_XXXXXXXX.K (K = 1, 2, ...) when that step already has a folder."""
    base = root / f"step_{step:08d}"
    if not base.exists():
        return base
    k = 1
    while (root / f"{base.name}.{k}").exists():
        k += 1
    return root / f"{base.name}.{k}"


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
    """Write checkpoint `step` atomically, move `latest` to it, then prune all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = _new_step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    save_file(_contiguous(ema.state_dict()), str(tmp / "ema.safetensors"),
              metadata={"step": str(step), "decays": json.dumps(ema.decays), "every": str(ema.every),
                        "halflife_kimg": json.dumps(ema.halflife_kimg), "rampup": str(ema.rampup)})
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), "step": step}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}, indent=2, default=str))
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)  # `final` is a new name: nothing that `latest` names is touched
    _fsync_dir(root)
    _atomic_write_text(root / LATEST, final.name + "\n")
    for old in list_checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_leftovers(root: Path) -> list[Path]:
    """Remove the temporary folders of checkpoint writes that were killed (``.tmp-*``); returns what it removed."""
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its meta.json exists)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(dirs, key=_order)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names when it is a complete checkpoint folder directly inside `root`, else the
    newest complete one (a pointer that names anything else, `../x` say, is ignored)."""
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _NAME.fullmatch(name) and (root / name / "meta.json").is_file():
            return root / name
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict; a missing, truncated or foreign file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist (the checkpoint is incomplete; use an "
                              f"earlier one or start the run again)")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc} (the file is damaged or not a "
                              f"safetensors file; delete this checkpoint folder to fall back to an earlier one)") from None


def load_ema_weights(ckpt: Path, index: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of EMA copy `index` (train.ema[index]) of checkpoint folder `ckpt`."""
    prefix = f"ema{index}."
    flat = load_weights(ckpt / "ema.safetensors", device)
    state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if not state:
        have = sorted({k.split(".", 1)[0] for k in flat})
        raise CheckpointError(f"{ckpt / 'ema.safetensors'} has no EMA copy {index} (it holds {', '.join(have) or 'none'}; "
                              f"choose one with --ema)")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """module.load_state_dict(state) with a CheckpointError that names `source` and the mismatching keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        raise CheckpointError(f"{source} does not fit this model: {', '.join(parts)}; it was written by another "
                              f"recipe ([backbone] or [data] differ)")
    module.load_state_dict(state)


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
    """Optimizer, RNG and step of a checkpoint folder (torch.load with weights_only=True: no code runs)."""
    path = Path(ckpt) / "state.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist (the checkpoint is incomplete)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, foreign pickle refused by weights_only, ...
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]} (the file is "
                              f"damaged, or not a fewstep checkpoint; nothing in it was executed)") from None


def read_meta(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
