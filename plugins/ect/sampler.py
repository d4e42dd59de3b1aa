"""ECT's few-step sampler (locuslab/ect generator_fn), in EDM sigma units.

    x = sigma_0 e                       sigma_0 = sigma_max = 80
    for i: x = D(x, sigma_i); if another level follows: x = x + sigma_{i+1} e_i   (fresh noise e_i)

1 step: D(80 e, 80). 2 steps: D(80 e, 80) -> + 0.821 e' -> D(., 0.821) (the official mid_t).
N steps: the levels after sigma_max are `mid_sigmas` when it holds exactly N - 1 values; otherwise
N - 1 levels spaced geometrically from sigma_max down to the last (smallest) of `mid_sigmas`
(sigma_k = sigma_max (m / sigma_max)^(k / (N - 1)), k = 1..N-1), which gives 0.821 itself for N = 2.
The result is x0 in data space, which is also fewstep's x at t = 0.
"""
from __future__ import annotations

import torch

from fewstep.api import BuildContext, Objective, Sampler


class ECTSampler(Sampler):
    def __init__(self, ctx: BuildContext, *, mid_sigmas: list[float]):
        super().__init__(ctx)
        self.mid_sigmas = [float(m) for m in mid_sigmas]
        if not self.mid_sigmas:
            raise ValueError("ect sampler: mid_sigmas needs at least one value")

    def sigmas(self, nfe: int, sigma_max: float) -> list[float]:
        """The noise levels the denoiser is evaluated at, starting with sigma_max (nfe values)."""
        if nfe < 1:
            raise ValueError(f"ect sampler: nfe must be at least 1, got {nfe}")
        if nfe == 1:
            return [sigma_max]
        if len(self.mid_sigmas) == nfe - 1:
            mids = list(self.mid_sigmas)
        else:
            last = self.mid_sigmas[-1]
            mids = [sigma_max * (last / sigma_max) ** (k / (nfe - 1)) for k in range(1, nfe)]
        levels = [sigma_max] + mids
        if any(a <= b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"ect sampler: noise levels must decrease from sigma_max, got {levels}")
        return levels

    @torch.no_grad()
    def sample(self, objective: Objective, net, noise, y, nfe, generator=None):
        if not hasattr(objective, "denoise"):
            raise TypeError(f"the ect sampler needs an objective with an EDM denoiser (ect), got {type(objective).__name__}")
        levels = self.sigmas(nfe, objective.sigma_max)
        b = noise.shape[0]
        x = noise * levels[0]
        for i, sigma in enumerate(levels):
            x = objective.denoise(net, x, torch.full((b,), sigma, device=noise.device, dtype=noise.dtype), y)
            if i + 1 < len(levels):
                fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + levels[i + 1] * fresh
        return x
