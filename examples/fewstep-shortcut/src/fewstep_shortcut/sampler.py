"""The `shortcut` sampler: nfe equal shortcut steps from noise (t = 1) to data (t = 0).

Times 1 = t_0 > t_1 > ... > t_nfe = 0 with t_i = 1 - i / nfe; each step is one network evaluation,
x <- x - d u(x, t_i, d) with d = 1 / nfe, i.e. the objective's flow map from t_i to t_{i+1}
(shortcut: x - (t - s) net(x, t, s, y)). No guidance and no re-noising. The steps the objective
trains are powers of two (2^-min_log2 .. 2^-(max_log2 - 1)), so nfe = 1, 2, 4, ... use trained step
sizes; any other nfe relies on the network's interpolation in d.
"""
from __future__ import annotations

import torch

from fewstep.api import BuildContext, Sampler


class ShortcutSampler(Sampler):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)

    @torch.no_grad()
    def sample(self, objective, net, noise, y, nfe, generator=None):
        if nfe < 1:
            raise ValueError(f"shortcut sampler: nfe must be >= 1, got {nfe}")
        b = noise.shape[0]
        times = torch.linspace(1.0, 0.0, nfe + 1, device=noise.device, dtype=noise.dtype)
        x = noise
        for i in range(nfe):
            x = objective.flow_map(net, x, times[i].expand(b), times[i + 1].expand(b), y)
        return x
