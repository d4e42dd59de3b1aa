"""The `shortcut` objective: Shortcut models (Frans, Hafner, Levine, Abbeel, "One Step Diffusion via
Shortcut Models", 2024) in fewstep's convention.

Convention (fewstep's, not the paper's): t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t e,
v = e - x0, and generation runs from t = 1 down to 0. The paper uses t = 0 for noise and t = 1 for
data; with t_ours = 1 - t_paper its step "x_{t+d} = x_t + d s(x_t, t, d)" becomes a step towards
smaller t here.

Parameterisation. The backbone is net(x, t, s, y) and embeds t and the gap t - s, so the step
size d is passed as the gap, s = t - d:

    u(x_t, t, d) = net(x_t, t, t - d, y)     the average velocity over [t - d, t]
    x_{t-d}      = x_t - d u(x_t, t, d)       one shortcut step towards the data

At d = 0 the network is the flow-matching velocity.

Loss. The batch is split by index: the first B - floor(bootstrap_share B) rows are flow matching
at d = 0, the rest self-consistency rows:

    FM rows:   t ~ U(0, 1) (or the 2^-max_log2 grid), target v = e - x0,
               labels replaced by the null class with probability label_drop
    SC rows:   trained step D = 2d = 2^-k, k uniform on {min_log2, ..., max_log2 - 1};
               t uniform on the multiples of D in [D, 1] (so t - 2d >= 0, as the paper samples t
               on multiples of the step); the target, without gradient (online weights):
                   u1    = u(x_t, t, d)
                   x_mid = x_t - d u1
                   u2    = u(x_mid, t - d, d)
                   u_tgt(x_t, t, 2d) = (u1 + u2) / 2
               labels as given (no dropout: the paper uses CFG only at d = 0)
    loss = mean over rows and elements of (u(x_t, t, d_row) - target)^2   (d_row = 0 or 2d)

The teacher evaluations run in eval mode when the network has active dropout (the official code
calls the model with train=False for them). No training-time guidance: label dropout on the FM
rows only lets an inference-time CFG sampler use the d = 0 velocity (e.g. fewstep's `ode` sampler
with cfg_scale > 1). Not done here: the official code's clipping of x_mid and of the target to
[-4, 4], and its use of the smallest step 1/128 (not 0) for the flow-matching rows.
"""
from __future__ import annotations

import math

import torch

from fewstep.api import Batch, BuildContext, LossOutput, Objective, expand_like, has_active_dropout, interpolate, velocity

TIME_DISTS = ("uniform", "grid")


def _up(x: torch.Tensor) -> torch.Tensor:
    """Network output under bf16/fp16 autocast -> float32 before differences (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mean_d(x: torch.Tensor) -> torch.Tensor:
    """Mean over every element of a row: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


class Shortcut(Objective):
    headline_metric = "fm_mse"

    # keyword-only and without defaults: the declared options (__init__.py) are the one place a default lives
    def __init__(self, ctx: BuildContext, *, bootstrap_share: float, min_log2: int, max_log2: int, time_dist: str,
                 label_drop: float):
        super().__init__(ctx)
        if min_log2 >= max_log2:
            raise ValueError(f"shortcut: min_log2 = {min_log2} must be < max_log2 = {max_log2} (self-consistency "
                             f"trains steps 2^-min_log2 .. 2^-(max_log2 - 1) from half steps down to 2^-max_log2)")
        if time_dist not in TIME_DISTS:
            raise ValueError(f"shortcut: time_dist must be one of {TIME_DISTS}, got {time_dist!r}")
        self.bootstrap_share = bootstrap_share
        self.min_log2, self.max_log2 = min_log2, max_log2
        self.time_dist = time_dist
        self.label_drop = label_drop
        self.null = ctx.data.null_class if ctx.data is not None else 0

    # -- contract ----------------------------------------------------------------------------
    def u(self, net, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The average velocity over a step d towards data: net(x, t, t - d, y)."""
        return _up(net(x, t, t - d, y))

    def flow_map(self, net, x, t, s, y):
        """x at time s <= t: x - (t - s) u(x, t, t - s)."""
        return x - expand_like(t - s, x) * _up(net(x, t, s, y))

    def velocity(self, net, x, t, y):
        """The instantaneous velocity: u at d = 0, i.e. the flow-matching prediction."""
        return _up(net(x, t, t, y))

    # -- randomness --------------------------------------------------------------------------
    def split(self, batch: int) -> tuple[int, int]:
        """(flow-matching rows, self-consistency rows): the first rows by index are FM."""
        n_sc = int(math.floor(self.bootstrap_share * batch))
        return batch - n_sc, n_sc

    def sample_fm_t(self, n: int, device, dtype=torch.float32) -> torch.Tensor:
        """t of the flow-matching rows, shape (n,)."""
        if self.time_dist == "grid":
            m = 2 ** self.max_log2  # official code: t_paper in {0, ..., (m - 1) / m} -> t in {1/m, ..., 1}
            return torch.randint(1, m + 1, (n,), device=device).to(dtype) / m
        return torch.rand(n, device=device, dtype=dtype)

    def sample_sc(self, n: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, D) of the self-consistency rows: D = 2^-k, k uniform on the levels; t uniform on {D, 2D, ..., 1}."""
        k = torch.randint(self.min_log2, self.max_log2, (n,), device=device)
        sections = torch.pow(2.0, k.to(dtype))  # 1 / D, exact
        j = torch.floor(torch.rand(n, device=device, dtype=dtype) * sections).clamp(max=sections - 1) + 1  # 1 .. 2^k
        return j / sections, 1.0 / sections

    # -- the loss ----------------------------------------------------------------------------
    def loss(self, net, batch: Batch, step: int) -> LossOutput:
        x0, y = batch.x, batch.y
        b, dev, dt = x0.shape[0], x0.device, x0.dtype
        n_fm, n_sc = self.split(b)
        t_fm = self.sample_fm_t(n_fm, dev, dt)
        t_sc, step_sc = self.sample_sc(n_sc, dev, dt)
        e = torch.randn_like(x0)
        if y is not None and self.label_drop > 0:
            dropped = torch.rand(n_fm, device=dev) < self.label_drop
        else:
            dropped = torch.zeros(n_fm, dtype=torch.bool, device=dev)
        return self.loss_given(net, x0, y, e, t_fm, t_sc, step_sc, dropped)

    @torch.no_grad()
    def shortcut_target(self, net, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                        y: torch.Tensor | None) -> torch.Tensor:
        """u_tgt(x_t, t, 2d) = (u(x_t, t, d) + u(x_{t-d}, t - d, d)) / 2 with x_{t-d} = x_t - d u(x_t, t, d)."""
        to_eval = has_active_dropout(net)
        if to_eval:
            net.train(False)
        try:
            u1 = self.u(net, x_t, t, d, y)
            x_mid = x_t - expand_like(d, x_t) * u1
            u2 = self.u(net, x_mid, t - d, d, y)
        finally:
            if to_eval:
                net.train(True)
        return (u1 + u2) / 2

    def loss_given(self, net, x0, y, e, t_fm, t_sc, step_sc, dropped) -> LossOutput:
        """The deterministic part of the loss given its random draws.

        Rows [:len(t_fm)] are flow matching at d = 0 with labels replaced by the null class where
        `dropped`; rows [len(t_fm):] train the step `step_sc` (= 2d) at `t_sc` on the self-consistency target.
        """
        n_fm, n_sc = t_fm.shape[0], t_sc.shape[0]
        t = torch.cat([t_fm, t_sc])  # (B,)
        d = torch.cat([torch.zeros_like(t_fm), step_sc])  # (B,): the step each row is trained at
        x_t = interpolate(x0, e, t)  # (B, C, H, W)
        y_in = None
        if y is not None:
            y_fm = torch.where(dropped, torch.full_like(y[:n_fm], self.null), y[:n_fm])
            y_in = torch.cat([y_fm, y[n_fm:]])
        targets = []
        if n_fm:
            targets.append(velocity(x0[:n_fm], e[:n_fm]))
        if n_sc:
            targets.append(self.shortcut_target(net, x_t[n_fm:], t_sc, step_sc / 2, None if y is None else y[n_fm:]))
        target = torch.cat(targets)
        pred = self.u(net, x_t, t, d, y_in)  # one forward with gradient for both kinds of rows
        err = _mean_d((pred - target) ** 2)  # (B,)
        metrics: dict[str, torch.Tensor] = {}
        if n_fm:
            metrics["fm_mse"] = err[:n_fm].detach().mean()
        if n_sc:
            metrics["sc_mse"] = err[n_fm:].detach().mean()
            metrics["sc_step"] = step_sc.detach().mean()
        return LossOutput(err.mean(), metrics)
