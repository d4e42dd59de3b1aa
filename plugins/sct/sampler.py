"""sCT sampling (paper Sec. 5.2, App. G.2; multistep CM sampling of Song et al. 2023), in fewstep time.

1 step:  start at a_max = arctan(sigma_max / sigma_d) (sigma_max 80: fewstep t = 80/81) from x = t_max e, i.e. the
         TrigFlow start z ~ N(0, sigma_d^2) read in fewstep units; x0 = f(x, t_max).
N steps: after each f, re-noise with fresh noise to the next TrigFlow time (paper: 1.1 for 2 steps, fewstep
         t = 0.4956): x = (1 - t) x0 + t e', then x0 = f(x, t).
`start = "noise"` starts at a = pi/2 (t = 1, TrigFlow's zero-SNR end) instead.
"""
from __future__ import annotations

import torch

from fewstep.api import BuildContext, Sampler

from .trig import trig_float


class SCTSampler(Sampler):
    def __init__(self, ctx: BuildContext, *, mid_times: list[float], start: str):
        super().__init__(ctx)
        if start not in ("sigma_max", "noise"):
            raise ValueError(f"sct sampler: start must be 'sigma_max' or 'noise', got {start!r}")
        self.mid_times, self.start = [float(m) for m in mid_times], start

    def times(self, objective, nfe: int) -> list[float]:
        """fewstep times at which f is evaluated (nfe values, decreasing)."""
        if nfe < 1:
            raise ValueError(f"sct sampler: nfe must be at least 1, got {nfe}")
        sd = objective.sigma_d
        first = 1.0 if self.start == "noise" else objective.t_max
        if nfe == 1:
            return [first]
        if len(self.mid_times) == nfe - 1:
            mids = [trig_float(a, sd) for a in self.mid_times]
        else:  # nfe - 1 TrigFlow times evenly spaced from the last given one up to (not including) the start
            a0 = torch.atan2(torch.tensor(first, dtype=torch.float64), torch.tensor(sd * (1 - first), dtype=torch.float64)).item()
            last = self.mid_times[-1]
            mids = [trig_float(a0 + (last - a0) * k / (nfe - 1), sd) for k in range(1, nfe)]
        levels = [first] + mids
        if any(p <= q for p, q in zip(levels, levels[1:])):
            raise ValueError(f"sct sampler: times must decrease, got {levels}")
        return levels

    @torch.no_grad()
    def sample(self, objective, net, noise, y, nfe, generator=None):
        if not hasattr(objective, "x0_hat") or not hasattr(objective, "sigma_d"):
            raise TypeError(f"the sct sampler needs the sct objective, got {type(objective).__name__}")
        b = noise.shape[0]
        levels = self.times(objective, nfe)
        x = levels[0] * noise
        x0 = x
        for i, t in enumerate(levels):
            x0 = objective.x0_hat(net, x, torch.full((b,), t, device=noise.device, dtype=noise.dtype), y)
            if i + 1 < len(levels):
                fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                nxt = levels[i + 1]
                x = (1 - nxt) * x0 + nxt * fresh
        return x0
