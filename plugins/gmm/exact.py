"""Exact quantities for Gaussian-mixture data under the linear path x_t = (1 - t) x0 + t e.

Data: x0 ~ sum_k pi_k N(mu_k, diag(sig_k^2)). Given component k, x_t ~ N((1 - t) mu_k, diag(S_k)) with
S_k(t) = (1 - t)^2 sig_k^2 + t^2, and (x0, e) | x_t, k are Gaussian:
    E[x0 | x_t, k] = mu_k + (1 - t) sig_k^2 / S_k (x_t - (1 - t) mu_k)
    E[e  | x_t, k] = t / S_k (x_t - (1 - t) mu_k)
The marginal velocity is the posterior-weighted sum
    v*(x, t) = sum_k w_k(x, t) (E[e | x, k] - E[x0 | x, k]),  w = softmax_k(log pi_k + log N(x; (1-t) mu_k, S_k)),
computed in float64 with log-sum-exp weights (stable at t = 0 and t = 1 as long as every sig_k > 0).
The exact flow map f*(x, t, s) integrates dx/dtau = v*(x, tau) from t to s with classical RK4
(`steps` uniform steps; the tested error against the single-Gaussian closed form is below 1e-6 at
the default 256 steps).
"""
from __future__ import annotations

import math

import torch


class GaussianMixture:
    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
        """weights (K,), means (K, d), stds (K, d) (isotropic: every column equal)."""
        w = weights.double()
        self.weights = w / w.sum()
        self.means = means.double()
        self.stds = stds.double()
        assert self.means.shape == self.stds.shape and self.means.shape[0] == self.weights.shape[0], \
            f"weights {tuple(weights.shape)}, means {tuple(means.shape)}, stds {tuple(stds.shape)} disagree"
        assert (self.stds > 0).all(), "every component needs a positive std"

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (n, d) float64, component labels (n,))."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z, k

    # -- posterior over components at time t ---------------------------------------------
    def _terms(self, x: torch.Tensor, t: torch.Tensor):
        x = x.double()
        tt = t.double().view(-1, 1, 1)  # (B, 1, 1)
        mu, var = self.means[None], self.stds[None] ** 2  # (1, K, d)
        S = (1 - tt) ** 2 * var + tt ** 2  # (B, K, d)
        r = x[:, None, :] - (1 - tt) * mu  # (B, K, d) residual from the component's mean at t
        logp = -0.5 * ((r ** 2) / S + torch.log(2 * math.pi * S)).sum(-1) + torch.log(self.weights)[None]
        post = torch.softmax(logp, dim=1)  # (B, K)
        return tt, var, S, r, post

    def velocity(self, x: torch.Tensor, t: torch.Tensor, component: torch.Tensor | None = None) -> torch.Tensor:
        """v*(x, t) (marginal), or the velocity conditional on a known component (class-conditional model)."""
        tt, var, S, r, post = self._terms(x, t)
        e_hat = tt / S * r
        x0_hat = self.means[None] + (1 - tt) * var / S * r
        v_k = e_hat - x0_hat  # (B, K, d)
        if component is not None:
            post = torch.nn.functional.one_hot(component.long(), self.weights.shape[0]).double()
        return (post[..., None] * v_k).sum(1)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x] (what a consistency model's D approximates at t)."""
        tt, var, S, r, post = self._terms(x, t)
        return (post[..., None] * (self.means[None] + (1 - tt) * var / S * r)).sum(1)

    def flow_map(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, steps: int = 256,
                 component: torch.Tensor | None = None) -> torch.Tensor:
        """f*(x, t, s): RK4 on dx/dtau = v*(x, tau) from tau = t to tau = s (per-row t, s)."""
        x = x.double()
        t, s = t.double().expand(x.shape[0]), s.double().expand(x.shape[0])
        h = ((s - t) / steps)[:, None]
        tau = t.clone()
        for _ in range(steps):
            th = tau + 0.5 * h[:, 0]
            k1 = self.velocity(x, tau, component)
            k2 = self.velocity(x + 0.5 * h * k1, th, component)
            k3 = self.velocity(x + 0.5 * h * k2, th, component)
            k4 = self.velocity(x + h * k3, tau + h[:, 0], component)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            tau = tau + h[:, 0]
        return x

    def average_velocity(self, x, t, r, steps: int = 256):
        """MeanFlow's u(x, r, t) = (x - f*(x, t, r)) / (t - r)."""
        return (x.double() - self.flow_map(x, t, r, steps)) / (t.double() - r.double())[:, None]

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely component of each sample at t = 0."""
        _, _, _, _, post = self._terms(x, torch.zeros(x.shape[0], dtype=torch.float64))
        return post.argmax(1)


def gaussian_flow_map(x, t, s, mu: float, s0: float):
    """Closed form for one isotropic Gaussian N(mu, s0^2): x_s = (1-s) mu + sqrt(S(s)/S(t)) (x_t - (1-t) mu)."""
    S = lambda u: (1 - u) ** 2 * s0 ** 2 + u ** 2
    ratio = torch.as_tensor(S(s) / S(t), dtype=torch.float64)
    return (1 - s) * mu + torch.sqrt(ratio) * (x - (1 - t) * mu)


# -- distances between sample sets ---------------------------------------------------------------

def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance (sqrt of the mean squared 1-D W2 over random directions)."""
    n = min(len(a), len(b))
    a, b = a[:n].double(), b[:n].double()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def energy_distance(a: torch.Tensor, b: torch.Tensor, max_n: int = 2000) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic: >= 0, exactly 0 for identical sets)."""
    a, b = a[:max_n].double(), b[:max_n].double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
