"""The full-scale recipes (recipes/full/: ImageNet 256 latents, CIFAR-10) pass `fewstep check`'s component checks
with the dataset replaced by its spec (the data itself is not on CI machines): every option, the backbone on the meta
device, the objective and the sampler are built and checked."""
from pathlib import Path

import pytest

from fewstep import build
from fewstep.interfaces import DataSource, DataSpec
from fewstep.recipe import load_recipe

FULL = sorted((Path(__file__).resolve().parents[1] / "recipes" / "full").glob("*.toml"))
SPECS = {"latents": DataSpec((4, 32, 32), 1000, "imagenet256-latents"), "cifar10": DataSpec((3, 32, 32), 0, "cifar10")}
PARAMS = {"imf_b2": 145.6e6, "imf_m2": 230.57e6, "imf_l2": 509.75e6, "imf_xl2": 711.11e6}  # training model, with v-head


class SpecOnly(DataSource):
    def __init__(self, spec):
        self.spec = spec

    def batches(self, *a, **k):  # pragma: no cover - never trained here
        raise NotImplementedError


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.name)
def test_full_recipe_components_check(path, monkeypatch):
    recipe = load_recipe(path)
    real = build.build_one

    def fake(reg, rec, table, ctx):
        if table == "data":
            return SpecOnly(SPECS[rec.data.name])
        return real(reg, rec, table, ctx)

    monkeypatch.setattr(build, "build_one", fake)
    facts = build.check_components(recipe)
    assert facts["shape"] == SPECS[recipe.data.name].shape
    name = path.stem
    if name in PARAMS:  # docs/objectives/imf.md size table (eval = this minus the 8 v-head blocks and final layer)
        assert abs(facts["parameters"] - PARAMS[name]) < 0.01e6


def test_there_are_full_recipes():
    assert {p.stem for p in FULL} >= {"imf_b2", "imf_m2", "imf_l2", "imf_xl2", "sct_cifar10"}
