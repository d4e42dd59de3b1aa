"""SoFlow's path and solution-function parameterisation, its time sampler and the r(k, K) schedules.

Path:              x_t = alpha(t) x0 + beta(t) e          (t = 0 data, t = 1 noise)
Solution function: f(x_t, t, s) = a(t, s) x_t + b(t, s) F(x_t, t, s)
Velocity read-out: v(x_t, t) = d f / d s at s = t = a_s(t) x_t + b_s(t) F(x_t, t, t)

euler: alpha = 1 - t, beta = t, a = 1, b = s - t            (a_s = 0, b_s = 1)
trig:  alpha = cos(pi t / 2), beta = sin(pi t / 2),
       a = cos(pi/2 (s - t)), b = sin(pi/2 (s - t))        (a_s = 0, b_s = pi / 2)
"""
from __future__ import annotations

import math

import torch

from fewstep.api import expand_like

HALF_PI = math.pi / 2


class Scheduler:
    def __init__(self, kind: str):
        if kind not in ("euler", "trig"):
            raise ValueError(f"parameterization must be 'euler' or 'trig', got {kind!r}")
        self.kind = kind

    # -- path ------------------------------------------------------------------------------
    def alpha(self, t):
        return 1 - t if self.kind == "euler" else torch.cos(HALF_PI * t)

    def beta(self, t):
        return t if self.kind == "euler" else torch.sin(HALF_PI * t)

    def path(self, x0, e, t):
        """x_t = alpha(t) x0 + beta(t) e."""
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.beta(t), x0) * e

    def path_velocity(self, x0, e, t):
        """d x_t / dt (the conditional velocity v)."""
        if self.kind == "euler":
            return e - x0
        return expand_like(HALF_PI * (-torch.sin(HALF_PI * t)), x0) * x0 + expand_like(HALF_PI * torch.cos(HALF_PI * t), x0) * e

    # -- solution function -----------------------------------------------------------------
    def a(self, t, s):
        return torch.ones_like(t) if self.kind == "euler" else torch.cos(HALF_PI * (s - t))

    def b(self, t, s):
        return s - t if self.kind == "euler" else torch.sin(HALF_PI * (s - t))

    def db_ds(self) -> float:
        """d b / d s at s = t (a constant for both parameterisations; d a / d s at s = t is 0)."""
        return 1.0 if self.kind == "euler" else HALF_PI

    def f(self, x, F, t, s):
        """f(x_t, t, s) = a x_t + b F."""
        return expand_like(self.a(t, s), x) * x + expand_like(self.b(t, s), x) * F

    def velocity(self, F_tt):
        """v = a_s x + b_s F(x, t, t) with a_s = 0."""
        return self.db_ds() * F_tt


def r_schedule(kind: str, k: int, K: int, r_init: float, r_end: float) -> float:
    """r(k, K) of l = t + (s - t) r; k = finished steps. Progress k/K is capped at 1 (past K r stays r_end)."""
    x = min(max(k / K, 0.0), 1.0) if K > 0 else 1.0
    if kind == "const":
        return r_end
    if kind == "linear":
        return r_init + (r_end - r_init) * x
    if kind == "cosine":
        return r_end + (r_init - r_end) * 0.5 * (1 + math.cos(math.pi * x))
    if kind == "exponent":
        return r_init * (r_end / r_init) ** x
    raise ValueError(f"unknown l schedule {kind!r}")


def sample_tsl(n: int, r: float, t_mean: float, t_std: float, s_mean: float, s_std: float, gap: float,
               device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The consistency triple exactly as coded (train.py:259-266): no sorting.

    t = max(time2, gap); s = min(time1, t - gap); l = min(t + (s - t) r, t - gap).
    When time1 > time2, s collapses to t - gap and l = s (the "degenerate" rows, ~14.5% on ImageNet).
    """
    time1 = torch.sigmoid(s_mean + s_std * torch.randn(n, device=device))
    time2 = torch.sigmoid(t_mean + t_std * torch.randn(n, device=device))
    t = torch.clamp(time2, min=gap)
    s = torch.minimum(time1, t - gap)
    l = torch.minimum(t + (s - t) * r, t - gap)
    return t, s, l


def cfg_decay(t: torch.Tensor, decay_time: float, k: float) -> torch.Tensor:
    """g(t): 1 for t <= decay_time, then 1 - exp(-k d / (1 - d)) with d = clamp((1 - t)/(1 - decay_time), 0, 1 - 1e-6)."""
    d = torch.clamp((1 - t) / (1 - decay_time), 0.0, 1 - 1e-6)
    g = 1 - torch.exp(-k * d / (1 - d))
    return torch.where(t <= decay_time, torch.ones_like(t), g)
