"""`gmm-exact`: score a model on Gaussian-mixture data against the exact solution function.

(a) flow-map error  E ||f_model(x_t, t, s) - f*(x_t, t, s)||^2  (summed over dimensions, averaged over
    samples) on a grid of (t, s) pairs including (1, 0), from the same x_t for every objective;
    each objective answers through its own `flow_map` contract (SoFlow's f, MeanFlow's
    z - (t - s) u, ECT's denoiser re-noised along its implied line, FM's one Euler step).
(b) distances between the N-NFE samples and true samples: sliced Wasserstein-2 and the energy
    distance, and mode coverage: the total-variation distance between the share of samples
    nearest each component and the component weights (0 = every mode at its weight).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fewstep.api import BuildContext, Evaluator

from .exact import energy_distance, sliced_w2

class GMMExact(Evaluator):
    inputs = "samples"

    def __init__(self, ctx: BuildContext, *, times: list[float], num_points: int, ode_steps: int, seed: int):
        super().__init__(ctx)
        self.times = sorted(set(float(t) for t in times) | {1.0, 0.0}, reverse=True)
        self.num_points, self.ode_steps, self.seed = num_points, ode_steps, seed

    def pairs(self) -> list[tuple[float, float]]:
        return [(t, s) for t in self.times for s in self.times if s < t]

    @torch.no_grad()
    def flow_map_errors(self, objective, net, data, device="cpu") -> dict[tuple[float, float], float]:
        mix = data.mixture
        g = torch.Generator().manual_seed(self.seed)
        x0, k = mix.sample(self.num_points, g)
        e = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        y = k.to(device) if data.spec.num_classes > 0 else None
        out = {}
        for t, s in self.pairs():
            tt = torch.full((self.num_points,), t, dtype=torch.float64)
            ss = torch.full((self.num_points,), s, dtype=torch.float64)
            x_t = (1 - t) * x0 + t * e
            exact = mix.flow_map(x_t, tt, ss, self.ode_steps, component=k if y is not None else None)
            model = objective.flow_map(net, x_t.float().to(device), tt.float().to(device), ss.float().to(device), y)
            out[(t, s)] = float(((model.double().cpu() - exact) ** 2).sum(1).mean())
        return out

    def evaluate(self, generated: torch.Tensor, reference: torch.Tensor, **info: Any) -> dict[str, float]:
        data = info.get("data")
        res: dict[str, float] = {
            "sliced_w2": sliced_w2(generated, reference, seed=self.seed),
            "energy": energy_distance(generated, reference),
        }
        if data is not None and hasattr(data, "mixture"):
            mix = data.mixture
            share = torch.bincount(mix.assign(generated.double()), minlength=len(mix.weights)).double() / len(generated)
            res["mode_tv"] = float(0.5 * (share - mix.weights).abs().sum())
            if info.get("objective") is not None:
                errs = self.flow_map_errors(info["objective"], info["net"], data, info.get("device", "cpu"))
                for (t, s), v in errs.items():
                    res[f"fmap_err_t{t:g}_s{s:g}"] = v
                res["fmap_err_1_0"] = errs[(1.0, 0.0)]
                res["fmap_err_mean"] = sum(errs.values()) / len(errs)
        return res

    def plot(self, results: dict[str, dict[str, float]], path: Path) -> Path | None:
        """Heat maps of the flow-map error over (t, s), one panel per model (results: name -> evaluate() output).

        `fewstep compare` calls this with every objective's metrics (docs/compare.md)."""
        results = {k: v for k, v in results.items() if any(m.startswith("fmap_err_t") for m in v)}
        if not results:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        names = list(results)
        times = self.times
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), dpi=100, squeeze=False)
        vmax = max(v for r in results.values() for k, v in r.items() if k.startswith("fmap_err_t"))
        for ax, name in zip(axes[0], names):
            grid = np.full((len(times), len(times)), np.nan)
            for i, t in enumerate(times):
                for j, s in enumerate(times):
                    key = f"fmap_err_t{t:g}_s{s:g}"
                    if key in results[name]:
                        grid[i, j] = results[name][key]
            im = ax.imshow(grid, cmap="magma", vmin=0, vmax=vmax)
            ax.set_xticks(range(len(times)), [f"{s:g}" for s in times])
            ax.set_yticks(range(len(times)), [f"{t:g}" for t in times])
            ax.set_xlabel("s")
            ax.set_ylabel("t")
            ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="E||f - f*||^2")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path
