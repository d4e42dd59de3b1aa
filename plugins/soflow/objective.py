"""The SoFlow objective (Solution Flow Models, ICLR 2026), faithful to zlab-princeton/SoFlow.

One step (models.py:122-207, train.py:224-281; docs/objectives/soflow.md), B rows split by index:
  rows[:nF]  flow matching at s = t:  L_FM  = mean_i sg(w_i) m_i,  m_i = mean_D (v_hat - v_tgt)^2,
                                      w_i = 1 / (|db/ds| (m_i + eps)^p)
  rows[nF:]  solution consistency:    student F_t = F(x_t, t, s) (grad), f_t = f(x_t, t, s)
                                      teacher (online weights, no grad, same dropout masks):
                                        x_l = x_t + (l - t) v_tgt,  f_l = f(x_l, l, s)
                                      q = (f_t - f_l) / (t - l),  w_i = 1 / (mean_D q^2 + eps)^p
                                      L_cons = mean_i sign(b) mean_D (F_t * sg(w_i q))   (surrogate)
  loss = (nF L_FM + nC L_cons) / B
The surrogate's gradient equals that of sg(w) mean_D ||f_t - sg(f_l)||^2 / (2 |b| (t - l)).
Training-time CFG (models.py:130-140, 170-182): v_g = v + g(t) (w - 1) (v - v_u), v_tgt = m v_g + (1 - m) v_c,
dropped rows train on (null class, v). Velocities v_u, v_c come from the model at s = t, no grad.

Efficiency (same maths as the official code): the student rows of both branches share one forward
with gradient (FM rows at s = t, consistency rows at s); the guidance velocities share one no-grad
forward. Nothing here is a JVP.
"""
from __future__ import annotations

import math

import torch

from fewstep.api import Batch, BuildContext, LossOutput, Objective, capture_rng, expand_like, has_active_dropout, restore_rng

from .scheduler import Scheduler, cfg_decay, r_schedule, sample_tsl


def _up(x: torch.Tensor) -> torch.Tensor:
    """Network outputs under bf16 autocast -> float32 before any finite difference (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mean_d(x: torch.Tensor) -> torch.Tensor:
    """Mean over every element of a row: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


class SoFlow(Objective):
    headline_metric = "fm_mse"

    def __init__(self, ctx: BuildContext, *, parameterization: str, fm_ratio: float, fm_t_mean: float, fm_t_std: float,
                 s_mean: float, s_std: float, t_mean: float, t_std: float, min_gap: float, l_schedule: str,
                 r_init: float, r_end: float, total_steps: int, p: float, eps: float, cfg_scale: float,
                 cfg_drop: float, mix_ratio: float, cfg_decay_time: float, cfg_decay_k: float):
        super().__init__(ctx)
        self.sch = Scheduler(parameterization)
        self.fm_ratio = fm_ratio
        self.fm_t = (fm_t_mean, fm_t_std)
        self.s_dist, self.t_dist = (s_mean, s_std), (t_mean, t_std)
        self.gap = min_gap
        self.l_schedule, self.r_init, self.r_end = l_schedule, r_init, r_end
        self.total_steps = total_steps or ctx.train_steps
        self.p, self.eps = p, eps
        # the official config's assertions: guidance needs dropped labels to learn v_u, and vice versa
        if (cfg_scale == 1.0) != (cfg_drop == 0.0):
            raise ValueError(f"soflow: cfg_scale = 1 requires cfg_drop = 0 and cfg_scale > 1 requires cfg_drop > 0 "
                             f"(got cfg_scale={cfg_scale}, cfg_drop={cfg_drop})")
        conditional = ctx.data is not None and ctx.data.num_classes > 0
        # Training-time CFG (label dropout, guided and mixed targets) exactly when the official code turns it on:
        # labelled data and cfg_scale > 1 (models.py get_velocity_loss / get_consistency_loss). With w = 1 the
        # mix ratio plays no part, even when m != 1: the official target is then the plain v.
        self.cfg_active = conditional and cfg_scale > 1.0
        self.w, self.drop, self.m = cfg_scale, cfg_drop, mix_ratio
        self.decay_time, self.decay_k = cfg_decay_time, cfg_decay_k
        self.null = ctx.data.null_class if ctx.data is not None else 0

    # -- contract --------------------------------------------------------------------------
    def flow_map(self, net, x, t, s, y):
        return self.sch.f(x, _up(net(x, t, s, y)), t, s)

    def velocity(self, net, x, t, y):
        return self.sch.velocity(_up(net(x, t, t, y)))

    def r(self, step: int) -> float:
        return r_schedule(self.l_schedule, step, self.total_steps, self.r_init, self.r_end)

    # -- CFG target (models.py:135-140, 172-182) -----------------------------------------------------------------
    def guided_target(self, v, v_u, v_c, t, dropped):
        """v_tgt = m [v + g(t) (w - 1) (v - v_u)] + (1 - m) v_c for kept rows; v for dropped rows."""
        g = expand_like(cfg_decay(t, self.decay_time, self.decay_k), v)
        v_g = v + g * (self.w - 1) * (v - v_u)
        v_tgt = self.m * v_g + (1 - self.m) * v_c
        return torch.where(expand_like(dropped, v), v, v_tgt)

    # -- the loss --------------------------------------------------------------------------
    def loss(self, net, batch: Batch, step: int) -> LossOutput:
        x0, y = batch.x, batch.y
        B, dev = x0.shape[0], x0.device
        nF = int(math.floor(self.fm_ratio * B))  # FM rows first, by index (not Bernoulli)
        r = self.r(step)
        # times: FM rows have s = t; consistency rows get the (t, s, l) triple
        t_fm = torch.sigmoid(self.fm_t[0] + self.fm_t[1] * torch.randn(nF, device=dev))
        t_c, s_c, l_c = sample_tsl(B - nF, r, *self.t_dist, *self.s_dist, gap=self.gap, device=dev)
        e = torch.randn_like(x0)
        # label dropout in the loss, per row (the DiT's own dropout is never used)
        if self.cfg_active and y is not None:
            dropped = torch.rand(B, device=dev) < self.drop
        else:
            dropped = torch.zeros(B, dtype=torch.bool, device=dev)
        out = self.loss_given(net, x0, y, e, torch.cat([t_fm, t_c]), torch.cat([t_fm, s_c]), l_c, dropped, batch.cond)
        out.metrics["r"] = r
        return out

    def loss_given(self, net, x0, y, e, t, s, l_c, dropped, cond=None) -> LossOutput:
        """The deterministic part of the loss: rows[:B - len(l_c)] are FM rows (s = t), the rest consistency rows.

        `cond`: the batch's extra per-row conditions (augmentation labels); every network call on a row gets that
        row's (official: get_velocity_loss / get_consistency_loss pass augment_labels to the student, the
        teacher and the guidance calls)."""
        cond = cond or {}
        B = x0.shape[0]
        nC = l_c.shape[0]
        nF = B - nC
        x_t = self.sch.path(x0, e, t)  # (B, C, H, W)
        v = self.sch.path_velocity(x0, e, t)
        y_in = torch.where(dropped, torch.full_like(y, self.null), y) if y is not None else None
        guided = self.cfg_active and y is not None

        # guidance velocities at s = t from the model itself, no gradient: v_u on all rows,
        # v_c on the consistency rows when m != 1 (the FM rows mix with their own detached prediction)
        v_u = v_c_cons = None
        if guided:
            with torch.no_grad():
                need_vc = self.m != 1.0 and nC > 0
                xs = torch.cat([x_t, x_t[nF:]]) if need_vc else x_t
                ts = torch.cat([t, t[nF:]]) if need_vc else t
                ys = torch.cat([torch.full_like(y, self.null), y[nF:]]) if need_vc else torch.full_like(y, self.null)
                cs = {k: torch.cat([c, c[nF:]]) for k, c in cond.items()} if need_vc else cond
                vel = self.sch.velocity(_up(net(xs, ts, ts, ys, **cs)))
                v_u = vel[:B]
                v_c_cons = vel[B:] if need_vc else torch.zeros_like(x_t[nF:])

        # student: one forward with gradient for both branches
        share_masks = nC > 0 and has_active_dropout(net)
        rng = capture_rng(x0.device) if share_masks else None
        F = _up(net(x_t, t, s, y_in, **cond))  # (B, C, H, W)

        metrics: dict[str, torch.Tensor | float] = {}
        total = x0.new_zeros(())

        # ---- flow-matching rows (models.py:122-158) ----
        if nF > 0:
            v_hat = self.sch.velocity(F[:nF])
            if guided:
                v_tgt_fm = self.guided_target(v[:nF], v_u[:nF], v_hat.detach(), t[:nF], dropped[:nF])
            else:
                v_tgt_fm = v[:nF]
            m_i = _mean_d((v_hat - v_tgt_fm) ** 2)  # (nF,)
            w_i = 1.0 / (abs(self.sch.db_ds()) * (m_i.detach() + self.eps) ** self.p)
            total = total + nF * (w_i * m_i).mean()
            metrics["fm_mse"] = m_i.detach().mean()

        # ---- solution-consistency rows (models.py:161-207) ----
        if nC > 0:
            xt, tt, ss, ll = x_t[nF:], t[nF:], s[nF:], l_c
            F_t = F[nF:]
            with torch.no_grad():
                if guided:
                    v_tgt = self.guided_target(v[nF:], v_u[nF:], v_c_cons, tt, dropped[nF:])
                else:
                    v_tgt = v[nF:]
                x_l = xt + expand_like(ll - tt, xt) * v_tgt  # one Euler step along the (guided) velocity
                if share_masks:
                    # replay the student's masks: teacher rows sit where the student's consistency rows sat
                    restore_rng(rng)
                    x_in = torch.cat([x_t[:nF], x_l])
                    F_l = _up(net(x_in, torch.cat([t[:nF], ll]), s, y_in, **cond))[nF:]
                else:
                    F_l = _up(net(x_l, ll, ss, None if y_in is None else y_in[nF:], **{k: c[nF:] for k, c in cond.items()}))
                f_l = self.sch.f(x_l, F_l, ll, ss)
                f_t = self.sch.f(xt, F_t.detach(), tt, ss)
                q = (f_t - f_l) / expand_like(tt - ll, xt)  # finite-difference quotient
                q2 = _mean_d(q ** 2)
                w_i = 1.0 / (q2 + self.eps) ** self.p
                sign_b = torch.sign(self.sch.b(tt, ss))
            # surrogate whose gradient is that of sg(w) mean_D ||f_t - sg(f_l)||^2 / (2 |b| (t - l))
            l_cons = (sign_b * _mean_d(F_t * (expand_like(w_i, q) * q))).mean()
            total = total + nC * l_cons
            metrics["cons_q2"] = q2.mean()
            metrics["cons_gap"] = (tt - ll).mean()
            metrics["degenerate"] = (ll <= ss).to(q2.dtype).mean()

        return LossOutput(total / B, metrics)
