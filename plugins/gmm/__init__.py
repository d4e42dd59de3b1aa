"""Gaussian-mixture data with an exact solution function (dataset `gmm`, evaluator `gmm-exact`,
backbone `mlp` for vector data).

For a Gaussian mixture the flow-matching velocity is known in closed form, so the exact solution
function f*(x_t, t, s) that SoFlow learns, MeanFlow's average velocity and a consistency model's
denoiser can be compared with what a model learned (see docs/gmm.md).
"""
from fewstep.api import Option, hookimpl

DATA_OPTIONS = [
    Option("components", int, 8, "number of components K", ge=1),
    Option("dim", int, 2, "dimension d (2 for pictures, up to 64)", ge=1, le=64),
    Option("layout", str, "ring", "means on a circle of `radius` in the first two coordinates, or random on a sphere",
           choices=("ring", "random")),
    Option("radius", float, 2.0, "distance of the means from the origin", gt=0),
    Option("std", float, 0.15, "isotropic std of every component (when `stds` is empty)", gt=0),
    Option("means", float, [], "explicit means, components * dim numbers row-major (overrides layout)", is_list=True),
    Option("stds", float, [], "explicit stds: K numbers (isotropic) or K * dim (diagonal)", is_list=True, gt=0),
    Option("weights", float, [], "component weights (normalised; empty: equal)", is_list=True, gt=0),
    Option("labels", bool, False, "feed the component index as a class label"),
    Option("num_samples", int, 50_000, "size of the fixed training set drawn from the mixture", ge=16),
    Option("seed", int, 0, "seed of the training set (and of random means)", ge=0),
]

MLP_OPTIONS = [
    Option("width", int, 256, "hidden width", ge=8),
    Option("depth", int, 4, "residual blocks", ge=1),
]

EVAL_OPTIONS = [
    Option("times", float, [1.0, 0.75, 0.5, 0.25], "times of the (t, s) grid (0 and 1 are always added)",
           is_list=True, ge=0, le=1),
    Option("num_points", int, 2000, "points per (t, s) pair for the flow-map error", ge=16),
    Option("ode_steps", int, 256, "RK4 steps of the exact flow map", ge=8),
    Option("seed", int, 0, "seed of the evaluation points", ge=0),
]


@hookimpl
def register_datasets(register):
    register("gmm", "fewstep_plugins.gmm.data:GMMSource", options=DATA_OPTIONS,
             description="Gaussian mixture in d dimensions with exact velocity and solution function")


@hookimpl
def register_backbones(register):
    register("mlp", "fewstep_plugins.gmm.mlp:build", options=MLP_OPTIONS,
             description="residual MLP net(x, t, s, y) for vector data, conditioned like the DiT")


@hookimpl
def register_evaluators(register):
    register("gmm-exact", "fewstep_plugins.gmm.evaluator:GMMExact", options=EVAL_OPTIONS,
             description="flow-map error against the exact f*, sliced W2, energy distance and mode coverage")
