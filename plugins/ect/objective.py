"""ECT: Easy Consistency Tuning (Geng et al., "Consistency Models Made Easy", 2024), after locuslab/ect.

One step (locuslab/ect training/loss.py:52-92; docs/objectives/ect.md), EDM VE convention, sigma written t:
    ln t ~ N(P_mean, P_std);  r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))) clamped at 0
    e ~ N(0, I) shared:  x_t = x0 + t e,  x_r = x0 + r e
    student  D_t = D(x_t, t)                      (with gradient)
    teacher  D_r = D(x_r, r)                      (same online weights, no grad, SAME dropout masks,
                                                   nan_to_num; rows with r = 0 use x0 itself)
    d_i = sum over elements (D_t - D_r)^2
    loss = mean_i (sqrt(d_i + c^2) - c) / (t - r)  (c = 0: the plain L2 norm)
`schedule = "ict"` swaps the (t, r) draw for iCT's discretisation curriculum (Karras grid of N(k)
points, discretised lognormal over its intervals, t = sigma_{i+1}, r = sigma_i); the rest is shared.

Conventions: the backbone sees the noise level as t_fm = sigma / (1 + sigma) in both time inputs
(see precond.py); flow_map / velocity convert fewstep's x_t = (1 - t) x0 + t e to VE and back.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fewstep.api import Batch, BuildContext, LossOutput, Objective, capture_rng, expand_like, load_run_ema, restore_rng

from .precond import EDMPrecond, karras_sigmas, lognormal_interval_probs, t_to_sigma

log = logging.getLogger(__name__)


# -- the (t, r) schedules ------------------------------------------------------------------------

def ect_stage(step: int, double_every: int) -> int:
    """Curriculum stage: the gap t - r shrinks by q every `double_every` optimizer steps."""
    return step // double_every


def ect_r(t: torch.Tensor, stage: int, q: float, k: float, b: float, mapping: str) -> torch.Tensor:
    """ECT's mapping from t to r, clamped at 0 (locuslab/ect training/loss.py, t_to_r_sigmoid / t_to_r_const):
    sigmoid: r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)));  const: r = t (1 - q^-(stage+1))."""
    if mapping not in ("sigmoid", "const"):
        raise ValueError(f"ect: mapping must be 'sigmoid' or 'const', got {mapping!r}")
    adj = 1 + k * torch.sigmoid(-b * t) if mapping == "sigmoid" else 1.0
    ratio = 1 - q ** -(stage + 1) * adj
    return (t * ratio).clamp_min(0)


def ict_num_points(step: int, total_steps: int, s0: int, s1: int) -> int:
    """iCT's N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


class ECT(Objective):
    headline_metric = "ect_d"

    def __init__(self, ctx: BuildContext, *, schedule: str, p_mean: float, p_std: float, mapping: str, q: float, k: float, b: float,
                 double_every: int, s0: int, s1: int, rho: float, total_steps: int, c: float, sigma_data: float,
                 sigma_min: float, sigma_max: float, init_from: str, grad_nan_to_num: bool,
                 noise_input: str):
        super().__init__(ctx)
        if not sigma_min < sigma_max:
            raise ValueError(f"ect: sigma_min ({sigma_min}) must be below sigma_max ({sigma_max})")
        if s1 < s0:
            raise ValueError(f"ect: s1 ({s1}) must be at least s0 ({s0})")
        self.precond = EDMPrecond(sigma_data, sigma_min, sigma_max, noise_input)
        self.schedule = schedule
        self.p_mean, self.p_std = p_mean, p_std
        self.mapping, self.q, self.k, self.b, self.double_every = mapping, q, k, b, double_every
        self.s0, self.s1, self.rho = s0, s1, rho
        self.total_steps = total_steps or ctx.train_steps
        self.c = c
        self.init_from = init_from
        self.grad_nan_to_num = grad_nan_to_num
        self._hooked = WeakIdKeyDictionary()  # parameters that already carry the gradient nan_to_num hook
        self._grid_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- EDM side ------------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return self.precond.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.precond.sigma_max

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None, **cond) -> torch.Tensor:
        """D(x, sigma) in the VE convention (train/eval coefficients follow net.training)."""
        return self.precond.denoise(net, x, sigma, y, **cond)

    # -- (t, r) --------------------------------------------------------------------------------
    def ict_grid(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (n,), interval probabilities (n - 1,)) of iCT's grid with n points."""
        key = (n, str(device))
        if key not in self._grid_cache:
            sig = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)
            probs = lognormal_interval_probs(sig, self.p_mean, self.p_std)
            self._grid_cache[key] = (sig.float().to(device), probs.float().to(device))
        return self._grid_cache[key]

    def sample_t_r(self, n: int, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise levels (t, r), each (n,), with r < t (r may be 0 under the ECT schedule)."""
        if self.schedule == "ict":
            sig, probs = self.ict_grid(ict_num_points(step, self.total_steps, self.s0, self.s1), device)
            i = torch.multinomial(probs, n, replacement=True)
            return sig[i + 1], sig[i]
        t = (torch.randn(n, device=device) * self.p_std + self.p_mean).exp()
        return t, ect_r(t, ect_stage(step, self.double_every), self.q, self.k, self.b, self.mapping)

    # -- loss ------------------------------------------------------------------------------------
    def _install_grad_hooks(self, net) -> None:
        """The official per-element nan_to_num of gradients (nan -> 0, +-inf -> +-1e5), as parameter
        hooks registered once per parameter: they rewrite each gradient before it is accumulated."""
        for p in net.parameters():
            if p.requires_grad and p not in self._hooked:
                p.register_hook(lambda g: torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5))
                self._hooked[p] = True

    def loss(self, net, batch: Batch, step: int) -> LossOutput:
        if self.grad_nan_to_num:
            self._install_grad_hooks(net)
        x0, y = batch.x, batch.y
        n = x0.shape[0]
        t, r = self.sample_t_r(n, step, x0.device)  # (B,) each, VE noise levels
        e = torch.randn_like(x0)  # one noise for both points
        x_t = x0 + expand_like(t, x0) * e
        x_r = x0 + expand_like(r, x0) * e

        rng = capture_rng(x0.device)
        d_t = self.denoise(net, x_t, t, y, **batch.cond)  # student, with gradient (official: same augment labels)
        pos = r > 0
        if bool(pos.any()):
            restore_rng(rng)  # replay the student's dropout masks
            with torch.no_grad():
                d_r = torch.nan_to_num(self.denoise(net, x_r, r, y, **batch.cond))
            d_r = torch.where(expand_like(pos, x0), d_r, x0)
        else:
            d_r = x0

        d = (d_t.float() - d_r.float()).pow(2).flatten(1).sum(1)  # (B,) squared L2 distance
        dist = torch.sqrt(d + self.c ** 2) - self.c if self.c > 0 else torch.sqrt(d)
        gap = (t - r).float()
        loss = (dist / gap).mean()
        metrics = {"ect_d": d.detach().mean(), "ect_gap": gap.mean(), "ect_r0_frac": (~pos).float().mean()}
        if self.schedule == "ict":
            metrics["ict_N"] = float(ict_num_points(step, self.total_steps, self.s0, self.s1))
        else:
            metrics["ect_stage"] = float(ect_stage(step, self.double_every))
        return LossOutput(loss, metrics)

    # -- fewstep convention --------------------------------------------------------------------
    def to_ve(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fewstep (x, t) -> (x_ve, sigma) with sigma clamped to [sigma_min, sigma_max].

        x_ve = x (1 + sigma) exactly for sigma <= sigma_max; above it (t -> 1, sigma -> inf, where
        the core keeps its noise) the input is read at sigma_max: x_ve = x sigma_max / t, i.e.
        sigma_max (e + x0 / sigma); at t = 1 that is sigma_max e, where ECT's samplers start.
        """
        sigma = t_to_sigma(t)
        scale = torch.where(sigma > self.sigma_max, self.sigma_max / t, 1 + sigma)
        return x * expand_like(scale.to(x.dtype), x), sigma.clamp(self.sigma_min, self.sigma_max)

    def x0_hat(self, net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x_ve, sigma = self.to_ve(x, t)
        return self.denoise(net, x_ve, sigma, y)

    def flow_map(self, net, x, t, s, y):
        """x at time t -> time s: D gives x0, the implied noise e = (x - (1 - t) x0) / t, x_s = (1 - s) x0 + s e."""
        x0 = self.x0_hat(net, x, t, y)
        ratio = torch.where(t > 0, s / t.clamp_min(1e-12), torch.zeros_like(t))  # t = 0 implies s = 0
        return expand_like(1 - s, x) * x0 + expand_like(ratio, x) * (x - expand_like(1 - t, x) * x0)

    def velocity(self, net, x, t, y):
        """The implied flow-matching velocity (x - x0_hat) / t (t floored at t(sigma_min))."""
        x0 = self.x0_hat(net, x, t, y)
        t_floor = self.sigma_min / (1 + self.sigma_min)
        return (x - x0) / expand_like(t.clamp_min(t_floor), x)

    # -- warm start ----------------------------------------------------------------------------
    def prepare(self, net) -> None:
        """init_from: copy the first EMA copy of a fewstep run into the backbone (fresh runs only)."""
        if not self.init_from:
            return
        try:
            state, found = load_run_ema(self.init_from, 0)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"ect init_from: {exc}") from None
        own = net.state_dict()
        try:
            net.load_state_dict({k: v.to(dtype=own[k].dtype if k in own else v.dtype) for k, v in state.items()})
        except RuntimeError as exc:
            raise RuntimeError(f"ect init_from: the weights of {found} do not fit this backbone "
                               f"(use the same [backbone] table as that run): {exc}") from exc
        log.info("ect: backbone initialised from the EMA weights of %s", found)
