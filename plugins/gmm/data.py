"""The `gmm` data source: K Gaussian components in d dimensions, with an exact solution function."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from fewstep.api import BuildContext, TensorSource

from .exact import GaussianMixture


def mixture_from_options(components: int, dim: int, layout: str, radius: float, std: float, means: list[float],
                         stds: list[float], weights: list[float], seed: int) -> GaussianMixture:
    K, d = components, dim
    if means:
        if len(means) != K * d:
            raise ValueError(f"gmm: means needs components * dim = {K * d} numbers (row-major), got {len(means)}")
        mu = torch.tensor(means, dtype=torch.float64).view(K, d)
    elif layout == "ring":
        if d < 2:
            raise ValueError("gmm: the ring layout needs dim >= 2")
        ang = 2 * math.pi * torch.arange(K, dtype=torch.float64) / K
        mu = torch.zeros(K, d, dtype=torch.float64)
        mu[:, 0], mu[:, 1] = radius * ang.cos(), radius * ang.sin()
    else:  # random: means on a sphere of `radius`, a fixed draw from `seed`
        g = torch.Generator().manual_seed(seed)
        mu = torch.randn(K, d, generator=g, dtype=torch.float64)
        mu = radius * mu / mu.norm(dim=1, keepdim=True)
    if stds:
        if len(stds) not in (K, K * d):
            raise ValueError(f"gmm: stds needs {K} (isotropic) or {K * d} (diagonal) numbers, got {len(stds)}")
        sd = torch.tensor(stds, dtype=torch.float64)
        sd = sd.view(K, 1).expand(K, d).clone() if len(stds) == K else sd.view(K, d)
    else:
        sd = torch.full((K, d), std, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64) if weights else torch.ones(K, dtype=torch.float64)
    if len(w) != K:
        raise ValueError(f"gmm: weights needs {K} numbers, got {len(w)}")
    return GaussianMixture(w, mu, sd)


class GMMSource(TensorSource):
    def __init__(self, ctx: BuildContext, *, components: int, dim: int, layout: str, radius: float, std: float,
                 means: list[float], stds: list[float], weights: list[float], labels: bool, num_samples: int, seed: int):
        self.mixture = mixture_from_options(components, dim, layout, radius, std, list(means), list(stds),
                                            list(weights), seed)
        x, k = self.mixture.sample(num_samples, torch.Generator().manual_seed(seed))
        super().__init__(x.float(), k if labels else None, components if labels else 0, f"gmm{components}x{dim}")

    def save_preview(self, samples: torch.Tensor, path: Path, nrow: int | None = None, *, caption: str | None = None,
                     column_labels: list[str] | None = None) -> Path:
        """A scatter of the first two coordinates over the true samples (grey), titled with `caption`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ref = self.x[:4000]
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="data")
        ax.scatter(samples[:, 0].cpu(), samples[:, 1].cpu(), s=2, c="C3", label="model")
        lim = float(self.mixture.means.abs().max() + 4 * self.mixture.stds.max())
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7, markerscale=4)
        if caption:
            ax.set_title(caption, fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
