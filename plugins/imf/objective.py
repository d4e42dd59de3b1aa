"""Improved MeanFlow (Geng, Lu, Wu, Shechtman, Kolter, He 2025; official JAX code Lyy-iiis/imeanflow imf.py).

One training step, in fewstep's convention (z = (1 - t) x + t e, v = e - x; the network is u(z, t, s) with s = r):
    t, r          two logit-normal draws, t = max, r = min; the first int(fm_share B) rows get r = t  (fm rows)
    (t_min,t_max) U[0, 0.5] x U[0.5, 1], forced to (0, 1) on fm rows
    omega         p(omega) ~ omega^-beta on [1, 1 + s_max]
    v_c0, v_u     velocity head at gap 0 with (omega, label) and (1, null), interval (0, 1)   (one doubled pass)
    w_g           omega where t_min <= t <= t_max, else 1
    v_c           velocity head at gap 0 with (w_g, label), interval (0, 1): the JVP tangent
    v_g           v + (1 - 1/w_g) (v_c - v_u); class-dropped rows (first num_drop): label null, v_g = v
    u, du/dt      JVP of (z, t, r) -> u(z, t, r | omega, t_min, t_max, y_in) along (v_c, 1, 0)
    V             u + (t - r) sg(du/dt)                       (the compound instantaneous-velocity prediction)
    loss          mean_b [ err(V) / sg(err(V) + eps)^p + err(v_aux) / sg(err(v_aux) + eps)^p ],  err = sum (. - sg v_g)^2
The velocity head is the backbone's auxiliary v-head (`tangent = "v_head"`, official default: `forward_v` and
`forward_uv`) or u itself at s = t (`tangent = "boundary"`, no extra parameters, no second loss term).
Randomness is drawn in `loss`; `loss_core` is deterministic given it.
"""
from __future__ import annotations

import contextlib

import torch

from fewstep.api import (Batch, BuildContext, LossOutput, Objective, capture_rng, expand_like, interpolate,
                         logit_normal, restore_rng, velocity)

GUIDANCE = ("omega", "t_min", "t_max")


def unwrap(net):
    """The plain module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(net, "module", None)
        if isinstance(inner, torch.nn.Module) and type(net).__name__ in ("DistributedDataParallel", "DataParallel"):
            net = inner
        elif isinstance(getattr(net, "_orig_mod", None), torch.nn.Module):
            net = net._orig_mod
        else:
            return net


def takes_guidance(net) -> bool:
    """The backbone declares the guidance conditions omega, t_min, t_max."""
    cond = getattr(unwrap(net), "conditions", ()) or ()
    return all(k in cond for k in GUIDANCE)


def first_or_random(b: int, share: float, rows: str, device) -> torch.Tensor:
    if rows == "random":
        return torch.rand(b, device=device) < share
    return torch.arange(b, device=device) < int(share * b)


def sample_omega(b: int, beta: float, s_max: float, device) -> torch.Tensor:
    """omega ~ p(omega) proportional to omega^-beta on [1, 1 + s_max] by inverse CDF (official sample_cfg_scale)."""
    u = torch.rand(b, device=device)
    if beta == 1.0:
        return torch.exp(u * torch.log1p(torch.tensor(s_max)))
    log_base = (1.0 - beta) * torch.log1p(torch.tensor(s_max))
    return torch.exp(torch.log1p(u * torch.expm1(log_base)) / (1.0 - beta))


def math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def is_stochastic(module) -> bool:
    return module.training and any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
                                   for m in module.modules())


class IMF(Objective):
    headline_metric = "loss_u"
    manual_grad_sync = True  # the u/v pass calls the unwrapped module's forward_uv

    def __init__(self, ctx: BuildContext, *, t_mean: float, t_std: float, fm_share: float, fm_rows: str, p: float,
                 eps: float, tangent: str, cfg_beta: float, cfg_s_max: float, interval_min_hi: float,
                 interval_max_lo: float, class_drop: float, drop_rows: str, tangent_label: str, jvp_impl: str):
        super().__init__(ctx)
        for name, value, allowed in (("tangent", tangent, ("v_head", "boundary")), ("fm_rows", fm_rows, ("first", "random")),
                                     ("drop_rows", drop_rows, ("first", "random")),
                                     ("tangent_label", tangent_label, ("true", "input")),
                                     ("jvp_impl", jvp_impl, ("auto", "backbone", "torch"))):
            if value not in allowed:
                raise ValueError(f"imf: {name} must be one of {', '.join(allowed)}, got {value!r}")
        self.t_mean, self.t_std, self.fm_share, self.fm_rows = t_mean, t_std, fm_share, fm_rows
        self.p, self.eps, self.tangent = p, eps, tangent
        self.cfg_beta, self.cfg_s_max = cfg_beta, cfg_s_max
        self.interval_min_hi, self.interval_max_lo = interval_min_hi, interval_max_lo
        self.class_drop, self.drop_rows, self.tangent_label, self.jvp_impl = class_drop, drop_rows, tangent_label, jvp_impl
        self.num_classes = ctx.data.num_classes if ctx.data is not None else 0
        self.null = ctx.data.null_class if ctx.data is not None else 0

    # -- randomness ---------------------------------------------------------------------------------
    def sample_tr(self, b: int, device):
        t = logit_normal(b, self.t_mean, self.t_std, device)
        r = logit_normal(b, self.t_mean, self.t_std, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        fm = first_or_random(b, self.fm_share, self.fm_rows, device)
        return t, torch.where(fm, t, r), fm

    def sample_interval(self, b: int, fm: torch.Tensor):
        lo = torch.rand(b, device=fm.device) * self.interval_min_hi
        hi = self.interval_max_lo + torch.rand(b, device=fm.device) * (1 - self.interval_max_lo)
        return torch.where(fm, torch.zeros_like(lo), lo), torch.where(fm, torch.ones_like(hi), hi)

    def drop_mask(self, b: int, device) -> torch.Tensor:
        if self.drop_rows == "random":
            return torch.rand(b, device=device) < self.class_drop
        num_drop = int((torch.rand(b, device=device) < self.class_drop).sum())
        return torch.arange(b, device=device) < num_drop

    # -- network pieces -----------------------------------------------------------------------------
    def _velocity_head(self, net, z, t, y, cond):
        """The velocity head at gap 0: the backbone's v-head (`forward_v`) or u(z, t, t)."""
        core = unwrap(net)
        if self.tangent == "v_head":
            if not callable(getattr(core, "forward_v", None)) or not getattr(core, "has_v_head", True):
                raise ValueError(f"imf: tangent = 'v_head' needs a backbone with an auxiliary velocity head "
                                 f"(forward_v / forward_uv, e.g. imfdit with aux_head_depth > 0); "
                                 f"{type(core).__name__} has none: set tangent = 'boundary'")
            return core.forward_v(z, t, t, y, **cond)
        return net(z, t, t, y, **cond)

    def guidance(self, net, z, v, t, y, omega, t_min, t_max, cond):
        """(v_g, v_c, v_u): the guided target, the JVP tangent and the unconditional velocity, without gradient
        (official guidance_fn)."""
        guided = takes_guidance(net)
        b = z.shape[0]
        ones, zeros = torch.ones_like(t), torch.zeros_like(t)
        g = (lambda w: {"omega": w, "t_min": zeros_like(w), "t_max": ones_like(w)}) if guided else (lambda w: {})
        with torch.no_grad():
            if y is None:  # unconditional data: no guidance, the tangent is the head's own velocity
                v_c = self._velocity_head(net, z, t, None, {**cond, **g(ones)})
                return v, v_c, v_c
            cc = {k: torch.cat([c, c]) for k, c in cond.items()}
            both = self._velocity_head(net, torch.cat([z, z]), torch.cat([t, t]),
                                       torch.cat([y, torch.full_like(y, self.null)]),
                                       {**cc, **g(torch.cat([omega, ones]))})
            v_c0, v_u = both[:b], both[b:]
            on = (t >= t_min) & (t <= t_max)
            w_g = torch.where(on, omega, ones)
            v_c = v_c0.clone()
            off = (~on).nonzero().squeeze(1)
            if off.numel() > 0:  # the official second pass at w_g; where the gate is on it equals v_c0
                pick = lambda a: a.index_select(0, off)  # noqa: E731
                v_c[off] = self._velocity_head(net, pick(z), pick(t), pick(y),
                                               {**{k: pick(c) for k, c in cond.items()}, **g(pick(w_g))}).to(v_c.dtype)
            v_g = v + expand_like(1 - 1 / w_g, v) * (v_c - v_u).to(v.dtype)
        return v_g, v_c, v_u

    def u_dudt(self, net, z, t, r, y, tangent, cond):
        """du/dt along (tangent, 1, 0) without gradient, on the rows with r < t (zero elsewhere: multiplied by 0)."""
        core = unwrap(net)
        dudt = torch.zeros_like(z)
        rows = (t != r).nonzero().squeeze(1)
        if rows.numel() == 0:
            return dudt
        pick = lambda a: None if a is None else a.index_select(0, rows)  # noqa: E731
        zs, ts, rs, ys, dz = pick(z), pick(t), pick(r), pick(y), pick(tangent).to(z.dtype)
        cs = {k: pick(c) for k, c in cond.items()}
        hand = callable(getattr(core, "forward_jvp", None)) and not is_stochastic(core)
        if self.jvp_impl == "backbone" and not hand:
            raise ValueError(f"imf: jvp_impl = 'backbone' but {type(core).__name__} has no forward_jvp (or dropout is "
                             "active); use 'auto' or 'torch'")
        with torch.no_grad():
            if hand and self.jvp_impl != "torch":
                _, d = core.forward_jvp(zs, ts, rs, ys, dz, torch.ones_like(ts), torch.zeros_like(rs), **cs)
            else:
                with math_attention():
                    _, d = torch.func.jvp(lambda a, b_, c: core(a, b_, c, ys, **cs), (zs, ts, rs),
                                          (dz, torch.ones_like(ts), torch.zeros_like(rs)))
        return dudt.index_copy(0, rows, d.to(dudt.dtype))

    def weighted(self, pred, target):
        delta = (pred - target.detach()).to(torch.promote_types(pred.dtype, torch.float32))
        err = delta.pow(2).flatten(1).sum(1)
        return err / (err.detach() + self.eps).pow(self.p), err

    def loss_core(self, net, x0, e, t, r, y=None, drop=None, omega=None, t_min=None, t_max=None, cond=None) -> LossOutput:
        """The iMF loss given its randomness (times, noise, guidance draws, drop mask) and the batch's conditions."""
        cond = dict(cond or {})
        z = interpolate(x0, e, t)
        v = velocity(x0, e)
        ones = torch.ones_like(t)
        omega = ones if omega is None else omega
        t_min = torch.zeros_like(t) if t_min is None else t_min
        t_max = ones if t_max is None else t_max
        if y is None:
            omega = ones  # no labels: no guidance, and the network sees omega = 1
        rng = capture_rng(z.device)
        v_g, v_c, v_u = self.guidance(net, z, v, t, y, omega, t_min, t_max, cond)
        y_in = y
        if y is not None and drop is not None:
            y_in = torch.where(drop, torch.full_like(y, self.null), y)
            v_g = torch.where(expand_like(drop, v), v, v_g)
            if self.tangent_label == "input":  # dropped rows: the tangent is the null-label velocity
                v_c = torch.where(expand_like(drop, v_c), v_u, v_c)
        if takes_guidance(net):
            cond.update(omega=omega, t_min=t_min, t_max=t_max)
        dudt = self.u_dudt(net, z, t, r, y_in, v_c, cond)  # u of the dropped labels (official u_fn after cond_drop)
        restore_rng(rng)  # dropout masks: the gradient pass draws what the guidance pass drew
        if self.tangent == "v_head":
            u, v_aux = unwrap(net).forward_uv(z, t, r, y_in, **cond)
        else:
            u, v_aux = net(z, t, r, y_in, **cond), None
        V = u + expand_like(t - r, u) * dudt.to(u.dtype).detach()
        loss_u, err_u = self.weighted(V, v_g)
        total = loss_u
        n = v[0].numel()
        metrics = {"loss_u": (err_u / n).mean().detach()}
        if v_aux is not None:
            loss_v, err_v = self.weighted(v_aux, v_g)
            total = total + loss_v
            metrics["loss_v"] = (err_v / n).mean().detach()
        return LossOutput(total.mean(), metrics)

    # -- the Objective contract -------------------------------------------------------------------
    def loss(self, net, batch: Batch, step: int) -> LossOutput:
        x0 = batch.x
        b = x0.shape[0]
        t, r, fm = self.sample_tr(b, x0.device)
        e = torch.randn_like(x0)
        y = batch.y if (self.num_classes > 0 and batch.y is not None) else None
        t_min, t_max = self.sample_interval(b, fm)
        omega = sample_omega(b, self.cfg_beta, self.cfg_s_max, x0.device)
        drop = self.drop_mask(b, x0.device) if (y is not None and self.class_drop > 0) else None
        dt = x0.dtype
        return self.loss_core(net, x0, e, t.to(dt), r.to(dt), y, drop, omega.to(dt), t_min.to(dt), t_max.to(dt),
                              batch.cond)

    def flow_map(self, net, x, t, s, y, **cond):
        """z_s = z_t - (t - s) u(z_t, t, s | cond); `cond` carries the sampling-time guidance (omega, t_min, t_max)."""
        return x - expand_like(t - s, x) * net(x, t, s, y, **cond)

    def velocity(self, net, x, t, y, **cond):
        return net(x, t, t, y, **cond)


def zeros_like(a):
    return torch.zeros_like(a)


def ones_like(a):
    return torch.ones_like(a)
