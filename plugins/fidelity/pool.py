"""`fewstep-pool48`: a weight-free, deterministic feature extractor for torch-fidelity.

Tests and smoke runs use it to drive torch-fidelity's real code paths (datasets, batching,
statistics, KID subsets, IS splits, precision/recall neighbourhoods) without any downloaded
network: features are the 4x4 average-pooled RGB values (48 numbers in [0, 1]), and the "logits"
for the Inception Score are a fixed random projection of them (seed 0). Its numbers are not
comparable with Inception-based ones; use it to test pipelines, never to report results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

NAME = "fewstep-pool48"


class PoolFeatures(FeatureExtractorBase):
    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(48, 10, generator=g))  # (48, 10) fixed "classifier"

    def forward(self, x: torch.Tensor):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, f"expects uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}"
        pooled = F.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)  # (N, 48)
        feats = {"48": pooled, "logits_unbiased": 8.0 * (pooled - 0.5) @ self.proj}  # (N, 48), (N, 10)
        return tuple(feats[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "48", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "48", "kid": "48", "prc": "48"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)


def register() -> None:
    """Register the extractor with torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, PoolFeatures)
