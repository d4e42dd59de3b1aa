"""The core's probability path: t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t e, v = e - x0."""
from __future__ import annotations

import torch


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x."""
    return t.view(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t e for t of shape (B,)."""
    tb = expand_like(t, x0)
    return (1 - tb) * x0 + tb * e


def velocity(x0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The conditional velocity d x_t / dt = e - x0."""
    return e - x0


def logit_normal(n: int, mean: float, std: float, device=None) -> torch.Tensor:
    """sigmoid(N(mean, std)) samples of shape (n,)."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device))
