"""Flow matching (Lipman et al. 2023; Liu et al. 2023) in fewstep's convention.

x_t = (1 - t) x0 + t e, v = e - x0; the network at s = t predicts v:
    L = mean over batch and elements of (F(x_t, t, t, y) - v)^2.
Label dropout (null class) is done here so inference-time CFG works.
"""
from __future__ import annotations

import torch

from fewstep.api import Batch, BuildContext, LossOutput, Objective, expand_like, interpolate, logit_normal, velocity


def sample_t(n: int, dist: str, mean: float, std: float, device) -> torch.Tensor:
    if dist == "uniform":
        return torch.rand(n, device=device)
    return logit_normal(n, mean, std, device)


def drop_labels(y: torch.Tensor | None, p: float, null: int) -> torch.Tensor | None:
    if y is None or p <= 0:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < p
    return torch.where(drop, torch.full_like(y, null), y)


class FlowMatching(Objective):
    headline_metric = "fm_mse"

    def __init__(self, ctx: BuildContext, *, time_dist: str, t_mean: float, t_std: float, label_drop: float):
        super().__init__(ctx)
        self.time_dist, self.t_mean, self.t_std, self.label_drop = time_dist, t_mean, t_std, label_drop
        self.null = ctx.data.null_class if ctx.data is not None else 0

    def loss(self, net, batch: Batch, step: int) -> LossOutput:
        x0 = batch.x
        b = x0.shape[0]
        t = sample_t(b, self.time_dist, self.t_mean, self.t_std, x0.device)  # (B,)
        e = torch.randn_like(x0)
        y = drop_labels(batch.y, self.label_drop, self.null)
        return self.loss_given(net, x0, y, e, t, batch.cond)

    def loss_given(self, net, x0, y, e, t, cond=None) -> LossOutput:
        """The deterministic part: the loss of rows x0 given their noise e, times t and (dropped) labels y."""
        x_t = interpolate(x0, e, t)  # (B, C, H, W)
        v = velocity(x0, e)
        v_hat = net(x_t, t, t, y, **(cond or {}))
        v_hat = v_hat if v_hat.dtype == torch.float64 else v_hat.float()  # bf16 outputs -> float32; float64 stays
        mse = ((v_hat - v) ** 2).mean()
        return LossOutput(mse, {"fm_mse": mse.detach()})

    def flow_map(self, net, x, t, s, y):
        """One Euler step of the learned velocity: x + (s - t) v(x, t)."""
        return x + expand_like(s - t, x) * self.velocity(net, x, t, y)
