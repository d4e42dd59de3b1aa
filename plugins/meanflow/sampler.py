"""MeanFlow sampling (meanflow.py:102-124): flow-map composition, no re-noising, no CFG at sampling (it is baked in).

Times 1 -> 1 - 1/N -> ... -> 0 (uniform); each step z_r = z_t - (t - r) u(z_t, t, r), one NFE.
1 NFE: x = e - u(e, 1, 0), i.e. net(e, t=1, s=0, y). 2 NFE: 1 -> 0.5 -> 0 (the schedule the ports use).
"""
from __future__ import annotations

import torch

from fewstep.api import BuildContext, Sampler


class MeanFlowSampler(Sampler):
    def __init__(self, ctx: BuildContext):  # no options
        super().__init__(ctx)

    @torch.no_grad()
    def sample(self, objective, net, noise, y, nfe, generator=None):
        b = noise.shape[0]
        times = torch.linspace(1.0, 0.0, nfe + 1, device=noise.device, dtype=noise.dtype)
        z = noise
        for i in range(nfe):
            z = objective.flow_map(net, z, times[i].expand(b), times[i + 1].expand(b), y)
        return z
