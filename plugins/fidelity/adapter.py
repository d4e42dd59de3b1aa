"""The one place fewstep calls torch-fidelity: typed settings in, plain float metrics out.

torch-fidelity's ``calculate_metrics(**kwargs)`` silently ignores misspelt keywords and
defaults to ``cuda=True``, so every call goes through :func:`calculate`, which

- builds the keyword arguments from a typed :class:`FidelitySettings` and checks each name
  against ``torch_fidelity.defaults.DEFAULTS`` before calling;
- chooses ``cuda`` from availability (or the caller's explicit device);
- serves one feature extractor per call (torch-fidelity hands a single weights path to every
  extractor of a call, so FID + precision/recall in one call would load Inception into VGG16);
- clamps ``kid_subset_size`` and ``isc_splits`` to the sample counts (KID asserts otherwise);
- feeds uint8 (N, C, H, W) tensors as Datasets (grey repeated to 3 channels), never
  torch-fidelity's generator wrapper (broken with NumPy >= 1.24);
- caches only the reference (input2) features, under the caller's cache name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

METRICS = ("isc", "fid", "kid", "prc")
INCEPTION = "inception-v3-compat"
VGG16 = "vgg16"
DEFAULT_EXTRACTOR = {"isc": INCEPTION, "fid": INCEPTION, "kid": INCEPTION, "prc": VGG16}  # torch-fidelity 0.4.0

# torch-fidelity result key -> fewstep metric name
RESULT_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


@dataclass(frozen=True)
class FidelitySettings:
    feature_extractor: str = ""  # "": torch-fidelity's default for the metrics (inception-v3-compat; vgg16 for prc)
    weights_path: str = ""  # "": let torch-fidelity use its hub cache (and download when online)
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    isc_splits: int = 10
    prc_neighborhood: int = 3
    rng_seed: int = 2020
    cache_root: str = ""  # "": torch-fidelity's $TORCH_HOME/fidelity_cache
    reference_cache_name: str = ""  # "": do not cache the reference features


class ImageTensorDataset(Dataset):
    """uint8 (N, C, H, W) images served one by one as 3 x H x W (grey repeated), for torch-fidelity."""

    def __init__(self, images: torch.Tensor, progress: Callable[[int], None] | None = None):
        check_images(images, "images")
        self.images = images.cpu()
        self.progress = progress
        self._seen = torch.zeros(len(images), dtype=torch.bool)  # count each image once (torch-fidelity peeks at [0])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.images[i]  # (C, H, W)
        if self.progress is not None and not self._seen[i]:
            self._seen[i] = True
            self.progress(1)
        return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img


def check_images(x: torch.Tensor, what: str) -> None:
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] in (1, 3)):
        desc = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be a uint8 tensor (N, 1 or 3, H, W); got {desc}")
    if len(x) < 2:
        raise ValueError(f"{what}: need at least 2 images, got {len(x)}")


def extractor_for(metrics: Sequence[str], feature_extractor: str = "") -> str:
    """The single extractor serving `metrics`; raises if they need two (call once per extractor)."""
    names = {feature_extractor or DEFAULT_EXTRACTOR[m] for m in metrics}
    if len(names) != 1:
        raise ValueError(f"metrics {list(metrics)} need different feature extractors {sorted(names)}; call once per extractor")
    return names.pop()


def resolve_cuda(device: str) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def build_kwargs(metrics: Sequence[str], settings: FidelitySettings, n_generated: int, n_reference: int | None) -> dict:
    """The exact keyword arguments for torch_fidelity.calculate_metrics (inputs excluded)."""
    from torch_fidelity.defaults import DEFAULTS

    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}; got {list(metrics)}")
    binary = any(m != "isc" for m in metrics)
    if binary and not n_reference:
        raise ValueError(f"metrics {list(metrics)} compare against a reference; none given")
    extractor = extractor_for(metrics, settings.feature_extractor)
    n_min = min(n_generated, n_reference) if binary else n_generated
    if extractor in (INCEPTION, VGG16) and not settings.weights_path:
        # torch-fidelity would fetch the weights through torch.hub and unpickle them with weights_only=False
        raise ValueError(f"{extractor} needs a weights file fewstep verified (weights.resolve_inception / resolve_vgg16)")
    kw = {m: (m in metrics) for m in METRICS}
    kw.update(
        ppl=False,
        cuda=resolve_cuda(settings.device),
        batch_size=settings.batch_size,
        feature_extractor=extractor,
        feature_extractor_weights_path=settings.weights_path or None,
        rng_seed=settings.rng_seed,
        save_cpu_ram=True,  # in-memory tensors: no DataLoader worker processes
        verbose=False,  # progress comes from the caller's bar
        cache=bool(settings.reference_cache_name),
        cache_root=settings.cache_root or None,
        input1_cache_name=None,  # generated samples are never cached
        input2_cache_name=settings.reference_cache_name or None,
    )
    if "kid" in metrics:
        kw.update(kid_subsets=settings.kid_subsets, kid_subset_size=min(settings.kid_subset_size, n_min))
    if "isc" in metrics:
        kw.update(isc_splits=min(settings.isc_splits, n_generated))
    if "prc" in metrics:
        if settings.prc_neighborhood >= n_min:
            raise ValueError(f"precision/recall: prc_neighborhood={settings.prc_neighborhood} needs more than that many images per set (have {n_min})")
        kw.update(prc_neighborhood=settings.prc_neighborhood)
    bad = sorted(set(kw) - set(DEFAULTS))
    if bad:  # torch-fidelity would silently ignore them
        raise TypeError(f"not torch-fidelity {torch_fidelity_version()} arguments: {bad}")
    return kw


def calculate(generated: torch.Tensor, reference: torch.Tensor | None, metrics: Sequence[str], settings: FidelitySettings,
              progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """torch-fidelity metrics of `generated` against `reference` (uint8 (N, C, H, W)), one extractor.

    Returns fewstep names: fid, kid_mean, kid_std, isc_mean, isc_std, precision, recall, f_score.
    `progress(n)` is called as images go through the extractor.
    """
    import torch_fidelity

    from . import pool

    pool.register()
    check_images(generated, "generated")
    if reference is not None:
        check_images(reference, "reference")
        if generated.shape[1:] != reference.shape[1:]:
            raise ValueError(f"generated {tuple(generated.shape[1:])} and reference {tuple(reference.shape[1:])} images differ in shape")
    kw = build_kwargs(metrics, settings, len(generated), None if reference is None else len(reference))
    inputs = {"input1": ImageTensorDataset(generated, progress)}
    if reference is not None and any(m != "isc" for m in metrics):
        inputs["input2"] = ImageTensorDataset(reference, progress)
    raw = torch_fidelity.calculate_metrics(**inputs, **kw)
    return {RESULT_KEYS[k]: float(v) for k, v in raw.items() if k in RESULT_KEYS}


def torch_fidelity_version() -> str:
    from torch_fidelity.version import __version__

    return __version__
