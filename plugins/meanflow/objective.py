"""MeanFlow (Geng et al. 2025, official JAX code Gsunshine/meanflow) in fewstep's convention
(docs/objectives/meanflow.md).

The network predicts the average velocity u(z_t, t, r) = 1/(t - r) int_r^t v dtau as net(z, t, s=r, y)
(the DiT embeds t and the gap h = t - r). With z = (1 - t) x + t e and v = e - x (meanflow.py:206-256):
    v_g       = guided velocity (meanflow.py:171-200; v outside the CFG interval and on class-dropped rows)
    u, du/dt  = JVP of (z, t, r) -> u(z, t, r, y_in) along tangents (v_g, 1, 0)      (jvp.py)
    u_tgt     = sg(v_g - clip(t - r, 0, 1) du/dt)
    err_i     = sum over elements of (u - u_tgt)^2            (SUM, not mean)
    loss      = mean_i err_i / sg((err_i + eps)^p)
Randomness (t, r, e, class drop) is drawn in `loss`; `loss_core` is deterministic given it.
"""
from __future__ import annotations

import torch

from fewstep.api import Batch, BuildContext, LossOutput, Objective, expand_like, interpolate, logit_normal, velocity

from .jvp import is_stochastic, strip_ddp, u_and_dudt, unwrap


def leading_or_random(b: int, share: float, rows: str, device) -> torch.Tensor:
    """Bool mask (B,) selecting `share` of the rows: the first int(share B) by index, or Bernoulli(share)."""
    if rows == "random":
        return torch.rand(b, device=device) < share
    return torch.arange(b, device=device) < int(share * b)


class MeanFlow(Objective):
    headline_metric = "mse"

    def __init__(self, ctx: BuildContext, *, time_sampler: str, t_mean: float, t_std: float, r_mean: float,
                 r_std: float, fm_share: float, fm_rows: str, p: float, eps: float, omega: float, kappa: float,
                 cfg_t_min: float, cfg_t_max: float, class_drop: float, drop_rows: str, jvp_mode: str, jvp_impl: str,
                 jvp_compile: str, reuse_u_for_cfg: bool, jvp_fp32: bool):
        super().__init__(ctx)
        if cfg_t_min > cfg_t_max:
            raise ValueError(f"cfg_t_min = {cfg_t_min} must be <= cfg_t_max = {cfg_t_max}")
        if jvp_mode not in ("lean", "single"):
            raise ValueError(f"jvp_mode must be 'lean' or 'single', got {jvp_mode!r}")
        self.time_sampler, self.t_mean, self.t_std, self.r_mean, self.r_std = time_sampler, t_mean, t_std, r_mean, r_std
        self.fm_share, self.fm_rows = fm_share, fm_rows
        self.p, self.eps = p, eps
        self.omega, self.kappa, self.cfg_t_min, self.cfg_t_max = omega, kappa, cfg_t_min, cfg_t_max
        self.class_drop, self.drop_rows = class_drop, drop_rows
        if jvp_impl not in ("auto", "backbone", "torch"):
            raise ValueError(f"jvp_impl must be 'auto', 'backbone' or 'torch', got {jvp_impl!r}")
        if jvp_compile not in ("auto", "on", "off"):
            raise ValueError(f"jvp_compile must be 'auto', 'on' or 'off', got {jvp_compile!r}")
        self.jvp_mode, self.jvp_impl, self.reuse_u_for_cfg = jvp_mode, jvp_impl, reuse_u_for_cfg
        self.jvp_compile = jvp_compile
        self.jvp_fp32 = jvp_fp32
        # single: torch.func.jvp calls the unwrapped module for u too, so the engine must all-reduce grads by hand;
        # lean: u comes from an ordinary forward through the DDP wrapper, which syncs as usual.
        self.manual_grad_sync = jvp_mode == "single"
        self.num_classes = ctx.data.num_classes if ctx.data is not None else 0
        self.null = ctx.data.null_class if ctx.data is not None else 0

    # -- randomness ---------------------------------------------------------------------------
    def sample_tr(self, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), r <= t (meanflow.py:147-157): 'sorted' = official sample_tr / CIFAR v0; 'min' = CIFAR v1."""
        t = logit_normal(b, self.t_mean, self.t_std, device)
        r = logit_normal(b, self.r_mean, self.r_std, device)
        if self.time_sampler == "sorted":
            t, r = torch.maximum(t, r), torch.minimum(t, r)
        r = torch.where(leading_or_random(b, self.fm_share, self.fm_rows, device), t, r)  # data_proportion: r = t
        return t, torch.minimum(t, r)  # 'min' (v1): r = min(t, r) after the mask; a no-op for 'sorted'

    def drop_mask(self, b: int, device) -> torch.Tensor:
        """Class-dropped rows (meanflow.py:191-200): official num_drop = #(rand < p), then the FIRST num_drop rows."""
        if self.drop_rows == "random":
            return torch.rand(b, device=device) < self.class_drop
        num_drop = int((torch.rand(b, device=device) < self.class_drop).sum())
        return torch.arange(b, device=device) < num_drop

    # -- the deterministic pieces --------------------------------------------------------------
    def guided_velocity(self, net, z, v, t, y, drop=None) -> torch.Tensor:
        """v_g = omega v + (1 - omega - kappa) v_u + kappa v_c for t in [cfg_t_min, cfg_t_max], else v
        (meanflow.py:171-189).

        v_c = u(z, t, t, y), v_u = u(z, t, t, NULL): no gradient, eval mode (official train=False); computed only
        on the rows that use them (dropped rows keep v_g = v).
        """
        return self._guidance(net, z, v, t, y, drop)[0]

    def _guidance(self, net, z, v, t, y, drop=None, later=None, cond=None):
        """(v_g, pending). Guided rows in the bool mask `later` get v_c from the caller: here they receive
        omega v + (1 - omega - kappa) v_u, and `pending` (bool, B) marks them for the caller's + kappa v_c."""
        if y is None or (self.omega == 1.0 and self.kappa == 0.0):
            return v, None
        on = (t >= self.cfg_t_min) & (t <= self.cfg_t_max)
        if drop is not None:
            on = on & ~drop
        rows = on.nonzero().squeeze(1)
        if rows.numel() == 0:
            return v, None
        need_c = on if later is None else on & ~later
        c_rows = need_c.nonzero().squeeze(1)
        core = unwrap(net)
        was_training = core.training
        core.eval()
        try:
            with torch.no_grad():  # one forward: v_c on c_rows (label y), v_u on all guided rows (null label)
                zz = torch.cat([z.index_select(0, c_rows), z.index_select(0, rows)])
                tt = torch.cat([t.index_select(0, c_rows), t.index_select(0, rows)])
                yy = torch.cat([y.index_select(0, c_rows), torch.full_like(rows, self.null, dtype=y.dtype)])
                cc = {k: torch.cat([c.index_select(0, c_rows), c.index_select(0, rows)]) for k, c in (cond or {}).items()}
                both = strip_ddp(net)(zz, tt, tt, yy, **cc).to(v.dtype)  # a compiled backbone stays compiled
        finally:
            core.train(was_training)
        v_c_part, v_u = both[:c_rows.numel()], both[c_rows.numel():]
        g = self.omega * v.index_select(0, rows) + (1 - self.omega - self.kappa) * v_u
        v_c = torch.zeros_like(g)
        pos = torch.full((v.shape[0],), -1, dtype=torch.long, device=v.device)
        pos[rows] = torch.arange(rows.numel(), device=v.device)  # batch row -> position among the guided rows
        v_c = v_c.index_copy(0, pos[c_rows], v_c_part)
        g = g + self.kappa * v_c
        pending = None if later is None else on & later
        return v.index_copy(0, rows, g), pending

    def weighted_loss(self, u: torch.Tensor, u_tgt: torch.Tensor) -> LossOutput:
        """Adaptive weighting (meanflow.py:238-246): err summed over elements, w = 1 / sg(err + eps)^p,
        mean over rows."""
        delta = u - u_tgt.detach()
        delta = delta.to(torch.promote_types(delta.dtype, torch.float32))  # bf16 autocast: weigh in float32
        err = delta.pow(2).flatten(1).sum(1)  # (B,)
        w = (err.detach() + self.eps).pow(-self.p)
        loss = (w * err).mean()
        # raw errors: with p = 1 the weighted loss sits near 1 whatever the error (zhuyu-cs/MeanFlow #9)
        return LossOutput(loss, {"mse": (err / delta[0].numel()).mean().detach(), "sq_err_sum": err.mean().detach()})

    def loss_core(self, net, x0, e, t, r, y=None, drop=None, cond=None) -> LossOutput:
        """The MeanFlow loss given all its randomness: data x0, noise e, times t >= r (B,), labels y, drop mask, and
        the batch's extra per-row conditions `cond` (augmentation labels: every network call on a row gets its)."""
        z = interpolate(x0, e, t)
        v = velocity(x0, e)
        # r = t rows: v_c = u(z, t, t, y) is the u forward itself; their JVP tangent is irrelevant (h = 0)
        reuse = self.reuse_u_for_cfg and y is not None and not is_stochastic(unwrap(net))
        v_g, pending = self._guidance(net, z, v, t, y, drop, later=(t == r) if reuse else None, cond=cond)
        y_in = y if (y is None or drop is None) else torch.where(drop, torch.full_like(y, self.null), y)
        u, dudt = u_and_dudt(net, z, t, r, y_in, v_g, self.jvp_mode, self.jvp_fp32, self.jvp_impl,
                              self.jvp_compile, cond=cond)
        if pending is not None:  # guided rows have y_in = y, so u there is v_c (without gradient)
            v_g = torch.where(expand_like(pending, z), v_g + self.kappa * u.detach().to(v_g.dtype), v_g)
        h = expand_like((t - r).clamp(0, 1), z)
        u_tgt = (v_g - h * dudt.to(v_g.dtype)).detach()
        return self.weighted_loss(u, u_tgt)

    # -- the Objective contract ----------------------------------------------------------------
    def loss(self, net, batch: Batch, step: int) -> LossOutput:
        x0 = batch.x
        b = x0.shape[0]
        t, r = self.sample_tr(b, x0.device)
        e = torch.randn_like(x0)
        y = batch.y if (self.num_classes > 0 and batch.y is not None) else None  # unconditional: CFG off
        drop = self.drop_mask(b, x0.device) if (y is not None and self.class_drop > 0) else None
        return self.loss_core(net, x0, e, t.to(x0.dtype), r.to(x0.dtype), y, drop, batch.cond)

    def flow_map(self, net, x, t, s, y):
        """z_s = z_t - (t - s) u(z_t, t, s): exact identity at s = t."""
        return x - expand_like(t - s, x) * net(x, t, s, y)
