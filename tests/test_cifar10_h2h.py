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


# -- the driver, rehearsed on CPU: tiny runs, the weight-free feature extractor ---------------------------------------

def driver_env(tmp: Path, cifar: Path, **extra) -> dict:
    import os
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PY": sys.executable, "CIFAR": str(cifar),
           "REF": str(tmp / "ref.npz"), "REF_NUM": "40", "RUNS": str(tmp / "runs"), "OUT": str(tmp / "out"),
           "NUM": "16", "STEPS": "6", "FM_NFE": "1 2", "EMA": "0", "EVAL_OPTS": "-O feature_extractor=fewstep-pool48",
           "SET": "train.compile=false backbone.size=T/8 train.batch=8 eval.grid=10 eval.batch=16 train.log_every=1 "
                  "train.checkpoint_every=1000"}
    env.update(extra)
    return env


def drive(env: dict, *runs: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "cifar10_h2h.sh"), *runs], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_the_driver_trains_evaluates_scores_the_sanity_pairs_and_keeps_what_is_current(tmp_path):
    import json

    import numpy as np

    cifar = fake_cifar_root(tmp_path / "cifar", n=80)
    env = driver_env(tmp_path, cifar)
    res = drive(env, "fm:recipes/cifar10_fm.toml", "soflow:recipes/cifar10_soflow.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((tmp_path / "out" / "h2h.json").read_text())
    runs = {r["name"]: r for r in out["runs"]}
    assert runs["fm"]["steps"] == runs["soflow"]["steps"] == 6
    assert set(runs["fm"]["eval"]["0"]["fid"]) == {"1", "2"} and set(runs["soflow"]["eval"]["0"]["fid"]) == {"1", "2"}
    assert runs["fm"]["eval"]["0"]["steps"] == [6]  # FM's two NFE groups: two files, one step
    assert sorted(p.name for p in (tmp_path / "runs" / "fm").glob("eval_*.json")) == \
        ["eval_ema0_nfe1.json", "eval_ema0_nfe2.json"]
    # the sanity pairs: the driver's figures equal a direct computation from the statistics it wrote
    from fewstep_plugins.fidelity.stream import fid_from, load_stats

    def fid_of_npz(a, b):
        return fid_from(load_stats(a, 48), load_stats(b, 48))

    s = out["sanity"]
    sd = tmp_path / "runs" / "sanity"
    assert s["half"] == 20
    assert s["test_vs_train"] == pytest.approx(fid_of_npz(sd / "test.npz", tmp_path / "ref.npz"), abs=1e-3)
    assert s["train_half2_vs_half1"] == pytest.approx(fid_of_npz(sd / "train_h2.npz", sd / "train_h1.npz"), abs=1e-3)
    with np.load(sd / "train_h2.npz") as z:
        assert int(z["num"]) == 20
    table = (tmp_path / "out" / "h2h.md").read_text()
    assert "CIFAR-10 test (10k) vs train" in table and "| fm | fm | 0 | 6 |" in table

    # a second call: nothing to train, every evaluation current (kept, not redone), the sanity pairs kept
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("eval_*.json")}
    res = drive(env, "fm:recipes/cifar10_fm.toml", "soflow:recipes/cifar10_soflow.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("current (step 6), kept") == 3 and "sanity:" not in res.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # a run that cannot train makes the call fail (exit 1), the others still go through
    res = drive(env, "fm:recipes/cifar10_fm.toml", "bad:recipes/no_such.toml")
    assert res.returncode == 1 and "1 train/eval processes failed" in res.stdout, res.stdout


def test_the_driver_stopped_by_sigterm_checkpoints_its_runs_and_exits_143(tmp_path):
    import signal
    import time

    cifar = fake_cifar_root(tmp_path / "cifar", n=80)
    env = driver_env(tmp_path, cifar, STEPS="100000", SANITY="0")
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "cifar10_h2h.sh"), "fm:recipes/cifar10_fm.toml",
                             "soflow:recipes/cifar10_soflow.toml"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    metrics = [tmp_path / "runs" / n / "metrics.jsonl" for n in ("fm", "soflow")]
    t0 = time.time()
    while not all(m.is_file() and len(m.read_text().splitlines()) >= 3 for m in metrics):
        assert time.time() - t0 < 240 and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the driver alone: it passes the signal on to the trainers
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out
    for n in ("fm", "soflow"):
        latest = (tmp_path / "runs" / n / "checkpoints" / "latest").read_text().strip()
        assert int(latest.split("_")[-1]) >= 3  # a checkpoint of the step it reached, not step 0
        assert (tmp_path / "runs" / "logs" / f"{n}.train.rc").read_text().strip() == "143"
    assert "] eval " not in out and not list((tmp_path / "runs").rglob("eval_*.json"))  # no evaluation started
    assert (tmp_path / "out" / "h2h.tgz").is_file()  # and what exists was packed
