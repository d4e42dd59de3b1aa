"""Streaming FID and KID: torch-fidelity's feature extractor and metric functions, fed batch by batch.

Generated images arrive as an ``ImageStream`` (this rank's batches); each batch goes through the
extractor and only running sums stay: the count, the sum of features and the sum of their outer
products, in float64, so the mean and covariance are exact whatever the number of images or ranks
(the ranks' sums are added with ``stream.all_reduce_sum``). KID needs every feature (2048 floats an
image: 400 MB for 50,000), gathered in the set's order with ``stream.gather_batches``. FID comes from torch-fidelity's
``fid_statistics_to_metric``, KID from ``kid_features_to_metric``.

Reference statistics are stored as .npz in pytorch-fid's layout (``mu``, ``sigma``; ADM's evaluator
files hold the same two keys next to ``arr_0`` and the spatial ``mu_s``/``sigma_s``, which are
ignored), read with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fewstep.api import DataError, UserError

#: the largest KID feature set kept in memory (bytes)
MAX_FEATURE_BYTES = 8 << 30


class ReferenceStatsError(DataError):
    """A reference statistics file that cannot serve this evaluation."""


@dataclass
class FeatureSet:
    num: int
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: torch.Tensor | None = None  # (N, D) float32, when kept
    shape: tuple | None = None  # (C, H, W) of the images, as this rank saw them


class Extractor:
    """torch-fidelity's feature extractor for one metric, built from fewstep's verified weights file."""

    def __init__(self, name: str, weights_path: str, device: str, batch: int, metric: str = "fid"):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        from . import pool
        from .adapter import resolve_cuda

        pool.register()
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.layer = cls.get_default_feature_layer_for_metric(metric)
        kwargs = {"feature_extractor_weights_path": weights_path} if weights_path else {}
        self.device = torch.device("cuda") if resolve_cuda(device) else torch.device("cpu")
        self.net = cls(name, [self.layer], **kwargs).to(self.device).eval()
        self.batch = batch
        self.dim = int(self.layer) if str(self.layer).isdigit() else int(self(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[1])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 1|3, H, W) -> (b, D) float32 features, left on the extractor's device."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        out = [self.net(images[i:i + self.batch].to(self.device, non_blocking=True).contiguous())[0]
               for i in range(0, len(images), self.batch)]
        return torch.cat(out) if out else torch.zeros(0, 0, device=self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 1|3, H, W) -> (b, D) float64 features on the CPU."""
        f = self.features(images)
        return f.to(torch.float64).cpu() if f.numel() else torch.zeros(0, 0, dtype=torch.float64)


def feature_pass(stream, extract: Extractor, keep: bool, progress: Callable[[int], None] | None = None) -> FeatureSet:
    """Mean and covariance (and with `keep`, every feature) of a stream, over all ranks."""
    d = extract.dim
    n, kept, shape = 0, [], None
    # the sums stay on the extractor's device, in float64: no host copy or CPU 2048 x 2048 product per batch
    # (CIFAR-10 train on an H100: 3,511 images/s with the sums on the CPU, 3,991 with them here)
    dev = extract.device
    s1 = torch.zeros(d, dtype=torch.float64, device=dev)
    s2 = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for images in stream.batches():
        shape = shape or tuple(images.shape[1:])
        f = extract.features(images).to(torch.float64)
        n += len(f)
        s1 += f.sum(0)
        s2.addmm_(f.T, f)
        if keep:
            kept.append(f.float().cpu())
        if progress is not None:
            progress(len(f))
    local = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=dev), s1, s2.flatten()])
    total = stream.all_reduce_sum(local).cpu()
    n = int(round(total[0].item()))
    s1, s2 = total[1:1 + d], total[1 + d:].view(d, d)
    if n < 2:
        raise UserError(f"FID/KID need at least 2 images, got {n}")
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)  # the unbiased covariance, as numpy.cov
    features = None
    if keep:  # every rank: all features in one process's order, so KID's random subsets pick the same rows
        features = stream.gather_batches(kept)
        features = torch.zeros(0, d) if features is None else features
    return FeatureSet(n, mu.numpy(), sigma.numpy(), features, shape)


def fid_from(a: FeatureSet, b: FeatureSet) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)[KEY_METRIC_FID])


def kid_from(a: FeatureSet, b: FeatureSet, subsets: int, subset_size: int, rng_seed: int = 2020) -> dict[str, float]:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(a.features), len(b.features))
    out = kid_features_to_metric(a.features, b.features, kid_subsets=subsets, kid_subset_size=size, kid_degree=3,
                                 kid_gamma=None, kid_coef0=1, rng_seed=rng_seed, verbose=False)
    return {"kid_mean": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD])}


def check_feature_memory(num: int, dim: int, what: str) -> None:
    if num * dim * 4 > MAX_FEATURE_BYTES:
        raise UserError(f"{what} keeps every feature in memory: {num} images x {dim} features is "
                        f"{num * dim * 4 / 2**30:.1f} GiB, more than {MAX_FEATURE_BYTES / 2**30:.0f} GiB; evaluate "
                        f"fewer samples (--num) or only FID, which streams")


# -- .npz files ------------------------------------------------------------------------------------

def save_stats(path: Path, fs: FeatureSet, **meta: str) -> None:
    """mu, sigma (pytorch-fid / ADM layout), num, and with kept features `features`; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    arrays = {"mu": fs.mu, "sigma": fs.sigma, "num": np.array(fs.num)}
    arrays.update({k: np.array(str(v)) for k, v in meta.items()})
    if fs.features is not None:
        arrays["features"] = fs.features.numpy().astype(np.float32)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_stats(path: Path, dim: int, need_features: bool = False) -> FeatureSet:
    """A reference .npz (pytorch-fid's, ADM's or fewstep's), checked: keys mu and sigma, feature size `dim`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                raise ReferenceStatsError(f"reference statistics {path}: missing key(s) {missing} (it has {sorted(keys)}); a "
                                          f"statistics file holds mu (D,) and sigma (D, D), as pytorch-fid, ADM's evaluator "
                                          f"and `fewstep stats` write them")
            mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
            num = int(z["num"]) if "num" in keys else 0
            features = torch.from_numpy(np.asarray(z["features"], dtype=np.float32)) if need_features and "features" in keys else None
    except ReferenceStatsError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ReferenceStatsError(f"reference statistics {path} cannot be read as an .npz without pickles: {exc}") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ReferenceStatsError(f"reference statistics {path}: mu {mu.shape} and sigma {sigma.shape} do not fit this "
                                  f"feature extractor's {dim}-d features (expected ({dim},) and ({dim}, {dim})); use "
                                  f"statistics made with the same extractor")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceStatsError(f"reference statistics {path}: mu or sigma holds NaN or inf")
    if need_features and features is None:
        raise ReferenceStatsError(f"KID needs the reference's features, and {path} holds only statistics (mu, sigma); "
                                  f"evaluate KID against the data source's images (leave out --reference)")
    return FeatureSet(num, mu, sigma, features)


def cache_name(key: str, extractor: str, weights_sha256: str) -> str:
    h = hashlib.sha256(f"{key}|{extractor}|{weights_sha256}".encode()).hexdigest()[:20]
    return f"reference-{extractor}-{h}.npz"
