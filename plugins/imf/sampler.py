"""iMF sampling (official imf.py sample_one_step / generate): flow-map composition on linspace(1, 0, N + 1).

Each step z_r = z_t - (t - r) u(z_t, h = t - r | omega, t_min, t_max, y); the same guidance inputs at every step,
no re-noising. The guidance scale and interval are sampling-time conditions chosen here (the [sampler] table): they
reach the backbone as its declared conditions `omega`, `t_min`, `t_max` (a backbone that declares none gets none).
"""
from __future__ import annotations

import warnings

import torch

from fewstep.api import BuildContext, Sampler

from .objective import takes_guidance


class IMFSampler(Sampler):
    def __init__(self, ctx: BuildContext, *, omega: float, t_min: float, t_max: float):
        super().__init__(ctx)
        if t_min > t_max:
            raise ValueError(f"imf sampler: t_min = {t_min} must be <= t_max = {t_max}")
        self.omega, self.t_min, self.t_max = omega, t_min, t_max

    def conditions(self, net, b: int, device, dtype) -> dict:
        if not takes_guidance(net):
            return {}
        full = lambda v: torch.full((b,), v, device=device, dtype=dtype)  # noqa: E731
        return {"omega": full(self.omega), "t_min": full(self.t_min), "t_max": full(self.t_max)}

    @torch.no_grad()
    def sample(self, objective, net, noise, y, nfe, generator=None):
        if nfe < 1:
            raise ValueError(f"imf sampler: nfe must be at least 1, got {nfe}")
        b = noise.shape[0]
        cond = self.conditions(net, b, noise.device, noise.dtype)
        if cond and y is None and self.omega != 1.0:
            warnings.warn("imf sampler: omega != 1 has no effect without class labels", RuntimeWarning, stacklevel=2)
        times = torch.linspace(1.0, 0.0, nfe + 1, device=noise.device, dtype=noise.dtype)
        z = noise
        for i in range(nfe):
            z = objective.flow_map(net, z, times[i].expand(b), times[i + 1].expand(b), y, **cond)
        return z
