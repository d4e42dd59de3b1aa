"""The CIFAR-10 head-to-head family (recipes/cifar10_*.toml, issue 20): every recipe validates and builds, all share
one setting (only [objective] / [sampler] differ), each ablation changes exactly what it ablates, and the driver
benchmarks/cifar10_h2h.sh parses."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fakes import fake_cifar_root
from fewstep.build import check_components
from fewstep.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
FAMILY = sorted(p.stem for p in RECIPES.glob("cifar10_*.toml"))
OBJECTIVES = {"cifar10_fm": "fm", "cifar10_soflow": "soflow", "cifar10_meanflow": "meanflow", "cifar10_imf": "imf",
              "cifar10_ect": "ect", "cifar10_sct": "sct"}
# ablation -> the objective keys (and values) it changes relative to cifar10_soflow.toml
ABLATIONS = {"cifar10_soflow_fm025": {"fm_ratio": 0.25}, "cifar10_soflow_fm0": {"fm_ratio": 0.0},
             "cifar10_soflow_mse": {"p": 0.0}, "cifar10_soflow_nocfg": {"cfg_scale": 1.0, "cfg_drop": 0.0}}
SHARED = ("data", "backbone")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return fake_cifar_root(tmp_path_factory.mktemp("cifar"))


def load(name, root):
    return load_recipe(RECIPES / f"{name}.toml", [f"data.root={root}"])


def test_the_family_is_complete():
    assert set(FAMILY) == {"cifar10_base", *OBJECTIVES, *ABLATIONS}


@pytest.mark.parametrize("name", FAMILY)
def test_every_recipe_validates_and_builds(name, cifar):
    r = load(name, cifar)
    facts = check_components(r)
    assert facts["shape"] == (3, 32, 32) and facts["classes"] == 10
    assert r.objective.name == OBJECTIVES.get(name, "soflow" if name in ABLATIONS else "fm")


@pytest.mark.parametrize("name", [n for n in FAMILY if n != "cifar10_base"])
def test_only_objective_and_sampler_differ_from_the_base(name, cifar):
    base, r = load("cifar10_base", cifar), load(name, cifar)
    for table in SHARED:
        assert (r.component(table).name, r.component(table).options) == \
            (base.component(table).name, base.component(table).options), table
    assert r.train == base.train and r.eval == base.eval and r.loggers == base.loggers


def test_the_shared_setting(cifar):
    r = load("cifar10_base", cifar)
    assert (r.data.name, r.data.options["conditional"], r.data.options["flip"]) == ("cifar10", True, True)
    assert (r.backbone.name, r.backbone.options["size"]) == ("dit", "S/2")
    t = r.train
    assert (t["precision"], t["batch"], t["optimizer"], t["lr"], t["seed"]) == ("bf16", 128, "adamw", 1e-4, 0)
    assert t["ema"][0] == 0.9999 and t["weight_decay"] == 0.0
    assert r.eval["nfe"] == [1, 2] and r.eval["metrics"] == ["fid"] and r.eval["num_samples"] == 10_000


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_changes_exactly_its_key(name, cifar):
    ref, r = load("cifar10_soflow", cifar), load(name, cifar)
    assert r.objective.name == "soflow" and (r.sampler.name, r.sampler.options) == (ref.sampler.name, ref.sampler.options)
    diff = {k: v for k, v in r.objective.options.items() if ref.objective.options[k] != v}
    assert diff == ABLATIONS[name]


def test_schedules_follow_the_training_length(cifar):
    steps = load("cifar10_base", cifar).train["steps"]
    assert load("cifar10_soflow", cifar).objective.options["total_steps"] == 0  # 0: K = train.steps
    assert load("cifar10_ect", cifar).objective.options["double_every"] * 8 == steps  # ECT's 8 official stages


def test_training_time_cfg_where_the_official_setting_has_it(cifar):
    assert load("cifar10_soflow", cifar).objective.options["cfg_scale"] == 3.0
    mf = load("cifar10_meanflow", cifar).objective.options
    assert mf["omega"] / (1 - mf["kappa"]) == 2.0 and mf["class_drop"] == 0.1
    assert load("cifar10_imf", cifar).objective.options["tangent"] == "boundary"  # the DiT has no v-head


def test_the_driver_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "cifar10_h2h.sh")], check=True)
