"""TrigFlow (Lu & Song 2025, Sec. 3) <-> fewstep's path, converted at the objective's boundary.

TrigFlow: x^ = cos(a) x0 + sin(a) z with z = sigma_d e, a in [0, pi/2] (written a here, t^ in the docs).
fewstep:  x_t = (1 - t) x0 + t e, t in [0, 1].
Matching the signal-to-noise ratio (sigma_EDM = sigma_d tan a = t / (1 - t), App. B.2 Eq. 30):
    t  = sigma_d sin a / (cos a + sigma_d sin a)           a = atan2(t, sigma_d (1 - t))
    x^ = A(a) x_t,  A = cos a + sigma_d sin a               dt/da = sigma_d / A^2
The backbone's output F_fm (x0_hat = x_t - t F_fm) gives the TrigFlow network output through
    sigma_d F_trig = (sigma_d cos a - sin a) x_t + (sigma_d / A) F_fm,
and the consistency function f = cos a x^ - sin a sigma_d F_trig (Eq. 5) equals x_t - t F_fm: the same x0
estimate in both conventions, with no division by sin a. The log-normal proposal log(sigma_d tan a) ~ N(P_mean,
P_std^2) (Alg. 1) is exactly t ~ sigmoid(N(P_mean, P_std^2)).
"""
from __future__ import annotations

import math

import torch


def trig_to_t(a: torch.Tensor, sigma_d: float) -> torch.Tensor:
    s, c = torch.sin(a), torch.cos(a)
    return sigma_d * s / (c + sigma_d * s)


def t_to_trig(t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    return torch.atan2(t, sigma_d * (1 - t))


def scale_a(a: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """A(a) = cos a + sigma_d sin a: x^ = A x_t."""
    return torch.cos(a) + sigma_d * torch.sin(a)


def trig_float(a: float, sigma_d: float) -> float:
    """fewstep t of a TrigFlow time given as a Python float."""
    return sigma_d * math.sin(a) / (math.cos(a) + sigma_d * math.sin(a))


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def sigma_d_F(net, x_trig: torch.Tensor, a: torch.Tensor, y, sigma_d: float, cond: dict) -> torch.Tensor:
    """sigma_d F_trig(x^, a) computed through the fewstep backbone net(x_t, t, t, y) (gap 0, as ECT's boundary)."""
    A = scale_a(a, sigma_d)
    t = trig_to_t(a, sigma_d)
    x_t = x_trig / _bc(A, x_trig)
    f_fm = net(x_t, t, t, y, **cond)
    return _bc(sigma_d * torch.cos(a) - torch.sin(a), x_t) * x_t + _bc(sigma_d / A, x_t) * f_fm


def consistency(net, x_trig, a, y, sigma_d: float, cond: dict) -> torch.Tensor:
    """f(x^, a) = cos a x^ - sin a sigma_d F_trig (Eq. 5)."""
    return _bc(torch.cos(a), x_trig) * x_trig - _bc(torch.sin(a), x_trig) * sigma_d_F(net, x_trig, a, y, sigma_d, cond)
