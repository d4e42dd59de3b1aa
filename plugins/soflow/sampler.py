"""SoFlow sampling (inference.py:61-88): no CFG at sampling, guidance is baked into the model.

Times eval_time = [1, 1 - 1/N, ..., 0].
1 NFE:  x0 = f(e, 1, 0) (= e - F(e, 1, 0) for euler).
N NFE:  from each time t_i in eval_time[:-1] denoise to 0, x0 = f(x, t_i, 0); then re-noise to the
        next time with fresh noise e': x = alpha(t_{i+1}) x0 + beta(t_{i+1}) e' (consistency-model style).
"""
from __future__ import annotations

import torch

from fewstep.api import BuildContext, Sampler, expand_like


class SoFlowSampler(Sampler):
    def __init__(self, ctx: BuildContext, *, renoise: bool):
        super().__init__(ctx)
        self.renoise = renoise

    @torch.no_grad()
    def sample(self, objective, net, noise, y, nfe, generator=None):
        b = noise.shape[0]
        times = torch.linspace(1.0, 0.0, nfe + 1, device=noise.device)
        sch = getattr(objective, "sch", None)
        x = noise
        for i in range(nfe):
            t = times[i].expand(b)
            if not self.renoise:
                x = objective.flow_map(net, x, t, times[i + 1].expand(b), y)
                continue
            x0 = objective.flow_map(net, x, t, torch.zeros_like(t), y)
            if i == nfe - 1:
                return x0
            t_next = times[i + 1].expand(b)
            e = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            alpha = sch.alpha(t_next) if sch is not None else 1 - t_next
            beta = sch.beta(t_next) if sch is not None else t_next
            x = expand_like(alpha, x0) * x0 + expand_like(beta, x0) * e
        return x
