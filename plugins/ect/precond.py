"""EDM's VE preconditioning as ECT uses it, and the conversion to fewstep's flow-matching convention.

ECT (Geng et al. 2024) works in EDM's variance-exploding convention: x_sigma = x0 + sigma e with
sigma in [sigma_min, sigma_max] = [0.002, 80], and a denoiser

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, noise-cond(sigma)),
    c_in = 1 / sqrt(sigma_data^2 + sigma^2),
    training: c_skip = sd^2 / (sigma^2 + sd^2),               c_out = sigma sd / sqrt(sigma^2 + sd^2),
    eval:     c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),

so that in eval mode D(x, sigma_min) = x exactly (the consistency boundary condition is only
enforced at sampling time; training uses the plain EDM coefficients). The mode follows
``net.training``.

fewstep's core convention is t = 0 data, t = 1 noise, x_t = (1 - t) x0 + t e. The two are the
same path up to a rescaling: x_fm = x_ve / (1 + sigma) at t = sigma / (1 + sigma)
(equivalently sigma = t / (1 - t)).

Noise conditioning (option `noise_input`): EDM feeds c_noise = ln(sigma) / 4 to its UNet
("edm", the official value). fewstep backbones take two times t, s and embed t and the gap
t - s; with "edm" both receive c_noise (gap 0), which with the `unet` backbone is ECT's network
exactly (its gap columns then see a constant). "fm" feeds t_fm = sigma / (1 + sigma) instead: a
monotone reparameterisation of the same information, in the [0, 1] range the backbones' time
embeddings were built for, and exactly what a flow-matching network trained by this project saw
(t = s = t_fm), which is what makes an `init_from` warm start from such a run meaningful.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.api import expand_like


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """VE noise level -> flow-matching time: t = sigma / (1 + sigma) (sigma = inf gives t = 1)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """Flow-matching time -> VE noise level: sigma = t / (1 - t) (t = 1 gives inf)."""
    return t / (1 - t)


def ve_to_fm(x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 + sigma e  ->  (1 - t) x0 + t e with t = sigma / (1 + sigma)."""
    return x_ve / (1 + expand_like(sigma, x_ve))


def fm_to_ve(x_fm: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(1 - t) x0 + t e  ->  x0 + sigma e."""
    return x_fm * (1 + expand_like(sigma, x_fm))


@dataclass(frozen=True)
class EDMPrecond:
    """The ECM preconditioning around a fewstep backbone ``net(x, t, s, y)``."""

    sigma_data: float  # the values come from the objective's declared options (plugins/ect/__init__.py)
    sigma_min: float
    sigma_max: float
    noise_input: str = "fm"  # "fm": t = sigma / (1 + sigma); "edm": ln(sigma) / 4

    def coefficients(self, sigma: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in), each shaped like sigma (B,)."""
        sd2 = self.sigma_data ** 2
        root = torch.sqrt(sigma ** 2 + sd2)
        eff = sigma if training else sigma - self.sigma_min  # eval: the boundary D(x, sigma_min) = x
        c_skip = sd2 / (eff ** 2 + sd2)
        c_out = eff * self.sigma_data / root
        c_in = 1 / root
        return c_skip, c_out, c_in

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the backbone's two time inputs receive for noise level sigma: t_fm = sigma / (1 + sigma) ("fm"), or
        EDM's c_noise = ln(sigma) / 4 ("edm")."""
        if self.noise_input == "edm":
            return torch.log(sigma) / 4
        return sigma_to_t(sigma)

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None, **cond) -> torch.Tensor:
        """D(x, sigma): x (B, ...) in the VE convention, sigma (B,) > 0; returns the x0 estimate. `cond`: the
        batch's extra conditions (augmentation labels), handed to the backbone as they are."""
        c_skip, c_out, c_in = self.coefficients(sigma.to(x.dtype), net.training)
        t_in = self.time_input(sigma)
        f = net(expand_like(c_in, x) * x, t_in, t_in, y, **cond)
        return expand_like(c_skip, x) * x + expand_like(c_out, x) * f.to(x.dtype)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """The n-point Karras grid, increasing: sigma_i = (smin^(1/rho) + i/(n-1) (smax^(1/rho) - smin^(1/rho)))^rho."""
    ramp = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def lognormal_interval_probs(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """iCT's discretised lognormal: P(i) proportional to
    erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std)), i = 0..n-2."""
    z = torch.erf((torch.log(sigmas.double()) - p_mean) / (math.sqrt(2.0) * p_std))
    w = z[1:] - z[:-1]
    return w / w.sum()
