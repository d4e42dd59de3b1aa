"""`fewstep compare` and `fewstep eval`: one recipe, the objective swapped, a well-formed record.

A second objective (`fm-variant`: flow matching whose default time distribution is uniform) is
registered in-process, and the metrics run through torch-fidelity with the weight-free
`fewstep-pool48` extractor, so nothing here needs downloaded weights.
"""
import json

import pytest
import tomli_w
import torch
from typer.testing import CliRunner

import fewstep
from fewstep.cli import app
from fewstep.comparison import CompareError, objective_recipe
from fewstep.evaluation import build_evaluators, parse_options
from fewstep.engine.trainer import Trainer
from fewstep.options import Option
from fewstep.recipe import recipe_from_dict
from fewstep_plugins.fidelity import evaluator as evmod
from fewstep_plugins.fidelity import weights as W

from conftest import tiny_dict

POOL = ["-O", "feature_extractor=fewstep-pool48"]


class Variant:
    """flow matching with another default: the comparison must pick it up."""

    __name__ = "fm-variant-plugin"

    @fewstep.hookimpl
    def register_objectives(register):
        from fewstep_plugins.fm import FM_OPTIONS

        options = [Option("time_dist", str, "uniform", "t ~ U(0, 1)", choices=("logit_normal", "uniform"))
                   if o.name == "time_dist" else o for o in FM_OPTIONS]
        register("fm-variant", "fewstep_plugins.fm.objective:FlowMatching", default_sampler="ode", options=options,
                 description="flow matching, uniform t")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "fewstep-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("FEWSTEP_INCEPTION_WEIGHTS", raising=False)
    evmod._MEMO.clear()


@pytest.fixture
def variant(registry):
    registry.register_plugin(Variant, name="fm-variant-plugin")
    yield registry
    registry.unregister_plugin("fm-variant-plugin")


def recipe_file(tmp_path, **tables):
    d = tiny_dict(**tables)
    d["train"].update(steps=4, checkpoint_every=2, ema=[0.9])
    d["eval"].update(nfe=[1, 2], num_samples=24, grid=10, metrics=["fid", "kid"])
    p = tmp_path / "tiny.toml"
    p.write_text(tomli_w.dumps(d))
    return p


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args], prog_name="fewstep")
    return res


def test_only_the_objective_is_swapped(variant):
    base = recipe_from_dict(tiny_dict(objective={"name": "fm", "label_drop": 0.3, "time_dist": "logit_normal"},
                                      sampler={"name": "ode", "method": "heun"}))
    r = objective_recipe(base, "fm-variant", seed=7, eval_seed=1, registry=variant)
    assert r.objective.name == "fm-variant" and r.objective.options["time_dist"] == "uniform"  # its own defaults
    assert r.objective.options["label_drop"] == 0.1  # the base recipe's fm keys are dropped, not carried over
    assert r.sampler.name == "ode" and r.sampler.options["method"] == "euler"  # its default sampler, default options
    assert r.train["seed"] == 7 and r.eval["seed"] == 1
    assert (r.data, r.backbone) == (base.data, base.backbone)
    assert {k: v for k, v in r.train.items() if k != "seed"} == {k: v for k, v in base.train.items() if k != "seed"}


def test_compare_writes_one_entry_per_objective_and_nfe(tmp_path, variant):
    out = tmp_path / "cmp"
    res = invoke("compare", "fm", "fm-variant", "--recipe", recipe_file(tmp_path), "--out", out, *POOL)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "compare.json").read_text())
    assert [(e["objective"], e["nfe"]) for e in data["entries"]] == [("fm", 1), ("fm", 2), ("fm-variant", 1), ("fm-variant", 2)]
    for e in data["entries"]:
        assert e["seeds"] == [3] and e["sampler"]["name"] == "ode"
        assert set(e["metrics"]) == {"fid", "kid_mean", "kid_std"}
        assert len(e["metrics"]["fid"]["values"]) == 1 and e["metrics"]["fid"]["mean"] == e["metrics"]["fid"]["values"][0] > 0
        assert e["train"]["steps"] == [4] and e["train"]["ms_per_step"][0] > 0 and e["train"]["num_params"] > 0
    proto = data["protocol"]
    assert proto["budget"] == "equal-steps" and proto["steps"] == 4 and proto["nfe"] == [1, 2] and proto["seeds"] == [3]
    assert proto["num_samples"] == 24 and proto["reference"]["num"] == 24 and proto["reference"]["dataset"] == "digits"
    assert proto["evaluators"]["fid"]["extractor"] == "fewstep-pool48" and proto["evaluators"]["fid"]["torch_fidelity"]
    # metric vs step: the intermediate checkpoint (step 2) and the end (step 4), per objective
    assert sorted((c["label"], c["step"]) for c in data["curves"]) == [("fm", 2), ("fm", 4), ("fm-variant", 2), ("fm-variant", 4)]
    assert (out / "grids.png").stat().st_size > 0 and (out / "metrics.png").stat().st_size > 0
    assert data["files"]["training_curves"] == "training_curves.png" and (out / "training_curves.png").stat().st_size > 0
    assert "fm-variant" in res.output and "ms/step" in res.output and "torch-fidelity" in res.output
    # each objective ran with its own defaults, the same seed and data
    fm = (out / "fm" / "seed3" / "recipe.toml").read_text()
    var = (out / "fm-variant" / "seed3" / "recipe.toml").read_text()
    assert 'time_dist = "logit_normal"' in fm and 'time_dist = "uniform"' in var
    # a second call reuses the finished runs; --runs compares existing folders without training
    res = invoke("compare", "--runs", out / "fm" / "seed3", out / "fm-variant" / "seed3", "--nfe", "1", "--out", tmp_path / "again",
                 "--no-curve", *POOL)
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert [(e["objective"], e["nfe"]) for e in again["entries"]] == [("fm", 1), ("fm-variant", 1)]
    assert again["entries"][0]["metrics"]["fid"]["values"] == data["entries"][0]["metrics"]["fid"]["values"]  # same noise


def test_equal_time_budget_gives_every_run_the_same_seconds(tmp_path, variant):
    out = tmp_path / "cmp"
    res = invoke("compare", "fm", "fm-variant", "--recipe", recipe_file(tmp_path), "--out", out, "--budget", "equal-time",
                 "--seconds", "1.5", "--nfe", "1", "--no-curve", *POOL)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "compare.json").read_text())
    assert data["protocol"]["budget"] == "equal-time" and data["protocol"]["seconds"] == 1.5
    for obj in ("fm", "fm-variant"):
        text = (out / obj / "seed3" / "recipe.toml").read_text()
        assert "max_seconds = 1.5" in text
    for e in data["entries"]:
        assert e["train"]["wall_seconds"][0] < 1.5 + 1.0  # stopped at the budget (one step may run over)


def test_compare_without_weights_stops_before_training(tmp_path, variant, monkeypatch):
    monkeypatch.setattr(W, "_fid_helper_default", lambda: None)
    out = tmp_path / "cmp"
    res = invoke("compare", "fm", "fm-variant", "--recipe", recipe_file(tmp_path), "--out", out)
    assert res.exit_code == 2
    assert "FEWSTEP_INCEPTION_WEIGHTS" in res.output and "weights-inception-2015-12-05-6726825d.pth" in res.output
    assert not out.exists()  # nothing trained


def test_unknown_objective_or_option_fails_before_training(tmp_path, variant):
    res = invoke("compare", "fm", "fm-varaint", "--recipe", recipe_file(tmp_path), "--out", tmp_path / "cmp", *POOL)
    assert res.exit_code == 2 and "fm-variant" in res.output  # the nearest valid spelling
    assert not (tmp_path / "cmp" / "fm").exists()
    res = invoke("compare", "fm", "--recipe", recipe_file(tmp_path), "--out", tmp_path / "cmp", "-O", "kid_subsetz=3")
    assert res.exit_code == 2 and "kid_subsetz" in res.output
    assert parse_options(["a=3", "b=true", "c=/x/y.pt"]) == {"a": 3, "b": True, "c": "/x/y.pt"}
    with pytest.raises(CompareError):
        parse_options(["novalue"])
    with pytest.raises(CompareError, match="declared by none"):
        build_evaluators(["fid"], {"vgg16_weights": "x"})


class SamplesProbe:
    """An evaluator that wants the float samples (like gmm-exact) and the model, not uint8 images."""

    __name__ = "samples-probe-plugin"
    seen: dict = {}

    @fewstep.hookimpl
    def register_evaluators(register):
        from fewstep.interfaces import Evaluator

        class Probe(Evaluator):
            inputs = "samples"

            def evaluate(self, generated, reference, **info):
                SamplesProbe.seen = {"dtype": generated.dtype, "ref_dtype": reference.dtype, **info}
                return {"mean_gap": float((generated.mean() - reference.mean()).abs())}

        register("samples-probe", Probe)


def test_eval_gives_float_samples_and_the_model_to_a_samples_evaluator(tmp_path, tiny, registry):
    registry.register_plugin(SamplesProbe, name="samples-probe-plugin")
    run = tmp_path / "run"
    Trainer(tiny(eval={"nfe": [1], "grid": 4, "num_samples": 12}), run, show_progress=False).run()
    res = invoke("eval", run, "--metrics", "samples-probe,fid", "--nfe", "2", *POOL)
    assert res.exit_code == 0, res.output
    seen = SamplesProbe.seen
    assert seen["dtype"] == seen["ref_dtype"] == torch.float32
    assert seen["nfe"] == 2 and seen["num_samples"] == 12 and seen["objective"] is not None and seen["net"] is not None
    metrics = json.loads((run / "eval.json").read_text())["results"][0]["metrics"]
    assert set(metrics) == {"mean_gap", "fid"}


def test_eval_writes_eval_json(tmp_path, tiny):
    run = tmp_path / "run"
    Trainer(tiny(eval={"nfe": [1], "grid": 4, "num_samples": 20}), run, show_progress=False).run()
    res = invoke("eval", run, "--nfe", "1,2", "--metrics", "fid,kid,isc", *POOL)
    assert res.exit_code == 0, res.output
    data = json.loads((run / "eval.json").read_text())
    assert [r["nfe"] for r in data["results"]] == [1, 2] and data["step"] == 6
    assert set(data["results"][0]["metrics"]) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    p = data["protocol"]
    assert p["num_samples"] == 20 and p["labels"] == "uniform random" and p["reference"]["num"] == 20
    assert p["weights"] == "EMA copy 0 (decay 0.9)" and p["sampler"]["name"] == "ode"
    assert p["evaluators"]["kid"]["kid_subset_size"] == 20 and p["evaluators"]["fid"]["resolution"] == [1, 8, 8]
    # the same noise gives the same numbers
    res = invoke("eval", run, "--nfe", "1", "--metrics", "fid", "--out", tmp_path / "e2.json", *POOL)
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "e2.json").read_text())
    assert again["results"][0]["metrics"]["fid"] == data["results"][0]["metrics"]["fid"]


def test_an_interrupted_compare_continues_its_runs_without_force(tmp_path, variant):
    """A compare killed mid-way (simulated: a run left at its step-2 checkpoint without compare_train.json, the
    other finished) continues on the next call: the finished run is reused, the partial one resumes from its
    checkpoint and ends with the weights an uninterrupted run has; nothing is retrained."""
    import shutil

    from fewstep.engine import checkpoint as ckpt

    out = tmp_path / "cmp"
    args = ("compare", "fm", "fm-variant", "--recipe", recipe_file(tmp_path), "--out", out, "--nfe", "1", "--no-curve", *POOL)
    assert invoke(*args).exit_code == 0
    partial, finished = out / "fm" / "seed3", out / "fm-variant" / "seed3"
    full = ckpt.load_ema_weights(ckpt.latest_checkpoint(partial / "checkpoints"))
    # the kill: fm stopped after its step-2 checkpoint, before compare_train.json
    (partial / "compare_train.json").unlink()
    steps = ckpt.list_checkpoints(partial / "checkpoints")
    assert [ckpt.read_meta(c)["step"] for c in steps] == [2, 4]
    shutil.rmtree(steps[-1])
    (partial / "checkpoints" / "latest").write_text(steps[0].name + "\n")
    done_mtime = (finished / "checkpoints" / "latest").stat().st_mtime_ns
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    text = res.output.replace("\n", " ")
    assert "continuing the interrupted run" in text and "reusing the finished run" in text
    assert (finished / "checkpoints" / "latest").stat().st_mtime_ns == done_mtime  # not retrained
    resumed = ckpt.latest_checkpoint(partial / "checkpoints")
    assert ckpt.read_meta(resumed)["step"] == 4
    again = ckpt.load_ema_weights(resumed)
    assert again.keys() == full.keys() and all(torch.equal(again[k], full[k]) for k in full)  # bit-identical resume
    assert (partial / "compare_train.json").is_file()
