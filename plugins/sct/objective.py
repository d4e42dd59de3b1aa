"""sCT: continuous-time consistency training in TrigFlow (Lu & Song, ICLR 2025, Alg. 1), on fewstep's backbone.

One step (a = TrigFlow time, written t^ in the docs; z = sigma_d e):
    tau ~ N(P_mean, P_std^2);  t = sigmoid(tau)  (the same as a = arctan(e^tau / sigma_d))
    x^ = cos a x0 + sin a z;  dxdt = cos a z - sin a x0                  (the sample's own velocity: sCT)
    sigma_d F   = network output (with gradient)
    JF          = JVP of sigma_d F(., .) at (x^, a) along (cos a sin a dxdt, cos a sin a)      (no gradient)
    r           = min(1, step / warmup_steps)                            (tangent warm-up)
    g           = -cos^2 a (sigma_d sg(F) - dxdt) - r (cos a sin a x^ + JF)   (= cos a df/da at r = 1)
    g           = g / (||g|| + c)                                        (tangent normalisation)
    loss        = e^w(a) / D ||F - sg(F) - g||^2 - w(a)                   (adaptive weighting w, learned)
The network is the fewstep backbone; TrigFlow quantities are converted at this boundary (trig.py), so an FM-trained
fewstep checkpoint is the paper's diffusion-model initialisation. The gradient reaches theta only through the first
F: -2 e^w / D g . dF/dtheta.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from fewstep.api import (Batch, BuildContext, LossOutput, Objective, capture_rng, expand_like, load_run_ema,
                         logit_normal, restore_rng)

from .trig import sigma_d_F, t_to_trig, trig_to_t

log = logging.getLogger(__name__)

HEAD = "sct_weighting"  # name of the adaptive-weighting submodule on the backbone


def unwrap(net):
    while True:
        inner = getattr(net, "module", None)
        if isinstance(inner, nn.Module) and type(net).__name__ in ("DistributedDataParallel", "DataParallel"):
            net = inner
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        else:
            return net


class AdaptiveWeight(nn.Module):
    """w(a): positional (sinusoidal) features of the TrigFlow time a (identity c_noise, Sec. 4.1) -> Linear -> 1.

    The linear layer starts at zero, so w = 0 (unit weight) at initialisation. It runs in float32 with autocast
    off: under bf16 autocast the linear layer would round w to bf16, whose spacing near w = log(D) ~ 8 (the
    optimum for CIFAR-sized D) is 0.0625, so e^w could only move in 6.4% steps and small changes with time
    would be erased.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        dt = torch.promote_types(self.linear.weight.dtype, torch.float32)  # float32, or float64 in float64 tests
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=a.device, dtype=dt) / half)
        arg = a.to(dt)[:, None] * freqs[None]
        feats = torch.cat([arg.cos(), arg.sin()], -1)
        with torch.autocast(a.device.type, enabled=False):
            return nn.functional.linear(feats, self.linear.weight.to(dt), self.linear.bias.to(dt)).squeeze(-1)


def math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def normalise(g: torch.Tensor, c: float, mode: str) -> torch.Tensor:
    """g / (||g|| + c) per row: 'l2' = the L2 norm over all elements (paper Sec. 4.2), 'rms' = ||g|| / sqrt(D)."""
    n = g.flatten(1).norm(dim=1)
    if mode == "rms":
        n = n / math.sqrt(g[0].numel())
    return g / expand_like(n + c, g)


class SCT(Objective):
    headline_metric = "sct_err"
    manual_grad_sync = True  # the JVP calls the unwrapped module; the weighting head sits outside forward()

    def __init__(self, ctx: BuildContext, *, sigma_d: float, p_mean: float, p_std: float, tangent_c: float,
                 tangent_norm: str, warmup_steps: int, weighting: str, weight_channels: int, share_dropout: bool,
                 sigma_max: float, init_from: str):
        super().__init__(ctx)
        for name, value, allowed in (("tangent_norm", tangent_norm, ("l2", "rms", "none")),
                                     ("weighting", weighting, ("adaptive", "none"))):
            if value not in allowed:
                raise ValueError(f"sct: {name} must be one of {', '.join(allowed)}, got {value!r}")
        self.sigma_d, self.p_mean, self.p_std = sigma_d, p_mean, p_std
        self.tangent_c, self.tangent_norm, self.warmup_steps = tangent_c, tangent_norm, warmup_steps
        self.weighting, self.weight_channels, self.share_dropout = weighting, weight_channels, share_dropout
        self.sigma_max, self.init_from = sigma_max, init_from

    # -- boundary ----------------------------------------------------------------------------------
    def to_trig(self, t):
        return t_to_trig(t, self.sigma_d)

    def to_t(self, a):
        return trig_to_t(a, self.sigma_d)

    @property
    def t_max(self) -> float:
        """fewstep time of the sampling start a = arctan(sigma_max / sigma_d) (sigma_max 80: t = 80/81)."""
        return self.sigma_max / (1 + self.sigma_max)

    def extend(self, net) -> None:
        if self.weighting == "adaptive" and not hasattr(net, HEAD):
            net.add_module(HEAD, AdaptiveWeight(self.weight_channels))

    def warmup(self, step: int) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)

    # -- the tangent ---------------------------------------------------------------------------------
    def tangent(self, net, x_trig, a, dxdt, y, cond, ratio: float, sdF=None) -> torch.Tensor:
        """g before normalisation: -cos^2 (sigma_d F- - dxdt) - ratio (cos sin x^ + cos sin sigma_d dF-/da); no grad."""
        core = unwrap(net)
        cs = torch.cos(a) * torch.sin(a)
        with torch.no_grad(), math_attention():
            fn = lambda x_, a_: sigma_d_F(core, x_, a_, y, self.sigma_d, cond)  # noqa: E731
            prim, jf = torch.func.jvp(fn, (x_trig, a), (expand_like(cs, x_trig) * dxdt, cs))
        sdF = prim if sdF is None else sdF.detach()
        cos2 = expand_like(torch.cos(a) ** 2, x_trig)
        return -cos2 * (sdF - dxdt) - ratio * (expand_like(cs, x_trig) * x_trig + jf)

    def loss_core(self, net, x0, e, t, y=None, step: int = 0, cond=None) -> LossOutput:
        cond = cond or {}
        sd = self.sigma_d
        a = self.to_trig(t)
        z = sd * e
        ca, sa = expand_like(torch.cos(a), x0), expand_like(torch.sin(a), x0)
        x_trig = ca * x0 + sa * z
        dxdt = ca * z - sa * x0
        core = unwrap(net)
        rng = capture_rng(x0.device)
        g = self.tangent(net, x_trig, a, dxdt, y, cond, self.warmup(step))
        if self.share_dropout:
            restore_rng(rng)  # the gradient forward draws the JVP's dropout masks
        sdF = sigma_d_F(net, x_trig, a, y, sd, cond)
        F = sdF / sd
        ct = torch.promote_types(F.dtype, torch.float32)
        g = g.to(ct)
        g_raw_norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm != "none":
            g = normalise(g, self.tangent_c, self.tangent_norm)
        Fc = F.to(ct)
        d = g[0].numel()
        sq = (Fc - Fc.detach() - g).pow(2).flatten(1).sum(1)  # (B,)
        if self.weighting == "adaptive":
            w = getattr(core, HEAD)(a).to(ct)
            per_row = torch.exp(w) / d * sq - w
        else:
            per_row = sq / d
        metrics = {"sct_err": (sq.detach() / d).mean(), "sct_g_norm": g_raw_norm.mean().detach(),
                   "sct_warmup": float(self.warmup(step))}
        return LossOutput(per_row.mean(), metrics)

    def loss(self, net, batch: Batch, step: int) -> LossOutput:
        x0 = batch.x
        t = logit_normal(x0.shape[0], self.p_mean, self.p_std, x0.device).to(x0.dtype)
        e = torch.randn_like(x0)
        y = batch.y if (self.ctx.data is not None and self.ctx.data.num_classes > 0) else None
        return self.loss_core(net, x0, e, t, y, step, batch.cond)

    # -- fewstep convention ----------------------------------------------------------------------------
    def x0_hat(self, net, x, t, y, **cond):
        """f = x_t - t F_fm, equal to TrigFlow's cos a x^ - sin a sigma_d F (Eq. 5)."""
        return x - expand_like(t, x) * net(x, t, t, y, **cond)

    def flow_map(self, net, x, t, s, y, **cond):
        """x at t -> s: x0 = f(x, t), the implied noise e = (x - (1 - t) x0) / t, x_s = (1 - s) x0 + s e."""
        x0 = self.x0_hat(net, x, t, y, **cond)
        ratio = torch.where(t > 0, s / t.clamp_min(1e-12), torch.zeros_like(t))
        return expand_like(1 - s, x) * x0 + expand_like(ratio, x) * (x - expand_like(1 - t, x) * x0)

    def velocity(self, net, x, t, y, **cond):
        return net(x, t, t, y, **cond)

    def prepare(self, net) -> None:
        """init_from: the first EMA copy of a fewstep run (e.g. flow matching: the paper's diffusion-model init)."""
        if not self.init_from:
            return
        state, found = load_run_ema(self.init_from, 0)
        own = net.state_dict()
        missing = [k for k in own if k not in state and not k.startswith(HEAD + ".")]
        if missing:
            raise RuntimeError(f"sct init_from: {found} lacks {len(missing)} backbone weights (e.g. {missing[0]}); "
                               "use the same [backbone] table as that run")
        state = {k: v.to(dtype=own[k].dtype) for k, v in state.items() if k in own}
        net.load_state_dict(state, strict=False)
        log.info("sct: backbone initialised from the EMA weights of %s", found)
