"""Replaying random streams: a teacher forward that reuses the student's dropout masks.

    state = capture_rng(x.device)
    student = net(...)            # draws dropout masks
    restore_rng(state)
    with torch.no_grad():
        teacher = net(...)        # draws the same masks again
"""
from __future__ import annotations

from typing import Any

import torch


def capture_rng(device: torch.device | str | None = None) -> dict[str, Any]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        device, s = state["cuda"]
        torch.cuda.set_rng_state(s, device)


def has_active_dropout(module: torch.nn.Module) -> bool:
    """True when a forward of `module` would draw random dropout masks."""
    return module.training and any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())
