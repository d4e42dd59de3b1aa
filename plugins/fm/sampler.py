"""Euler / Heun integration of an objective's velocity from t = 1 to t = 0, with optional CFG.

NFE counts velocity evaluations (a guided evaluation batches its conditional and
unconditional calls and counts once). Heun with n steps uses 2n - 1 evaluations
(the last step is Euler, as in EDM), so nfe = 2n - 1.
"""
from __future__ import annotations

import torch

from fewstep.api import BuildContext, Objective, Sampler


class ODESampler(Sampler):
    def __init__(self, ctx: BuildContext, *, method: str, cfg_scale: float):
        super().__init__(ctx)
        self.method, self.cfg_scale = method, cfg_scale
        self.null = ctx.data.null_class if ctx.data is not None else 0

    def velocity(self, objective: Objective, net, x, t, y):
        if self.cfg_scale == 1.0 or y is None:
            return objective.velocity(net, x, t, y)
        both = objective.velocity(net, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null)]))
        v_c, v_u = both.chunk(2)
        return v_u + self.cfg_scale * (v_c - v_u)

    @torch.no_grad()
    def sample(self, objective, net, noise, y, nfe, generator=None):
        b = noise.shape[0]
        steps = nfe if self.method == "euler" else (nfe + 1) // 2
        ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
        x = noise
        for i in range(steps):
            t, s = ts[i].expand(b), ts[i + 1].expand(b)
            h = (ts[i + 1] - ts[i])
            v = self.velocity(objective, net, x, t, y)
            if self.method == "heun" and i < steps - 1:
                x_e = x + h * v
                v2 = self.velocity(objective, net, x_e, s, y)
                x = x + h * 0.5 * (v + v2)
            else:
                x = x + h * v
        return x
