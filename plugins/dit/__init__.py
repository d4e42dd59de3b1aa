"""The `dit` backbone plugin (registration only: importing this module does not import torch)."""
from fewstep.api import Option, hookimpl

OPTIONS = [
    Option("size", str, "B/2", "NAME/PATCH with NAME in T, XS, S, B, M, L, XL (T and XS are CPU sizes), e.g. 'XL/2'"),
    Option("depth", int, 0, "override the size's depth (0: from size)", ge=0),
    Option("hidden", int, 0, "override the size's width (0: from size)", ge=0),
    Option("heads", int, 0, "override the size's attention heads (0: from size)", ge=0),
    Option("mlp_ratio", float, 4.0, "MLP hidden width / model width", gt=0),
    Option("dropout", float, 0.0, "dropout in attention projections and MLPs", ge=0, lt=1),
    Option("attention", str, "fused", "'fused' (torch SDPA) or 'math' (explicit softmax, forward-AD capable)",
           choices=("fused", "math")),
    Option("gap_init", str, "xavier", "init of the gap (t - s) embedder's MLP: xavier (official SoFlow DiT, which "
           "re-initialises only the t embedder) or normal = N(0, 0.02) like the t embedder (official MeanFlow DiT)",
           choices=("xavier", "normal")),
]


@hookimpl
def register_backbones(register):
    register("dit", "fewstep_plugins.dit.build:build", options=OPTIONS,
             description="adaLN-Zero DiT conditioned on t, the gap t - s and a class label (null class for CFG)")
