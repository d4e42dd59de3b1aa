"""Tests of the fewstep-shortcut plugin: closed forms on stub networks, the sampler's schedule,
registration through fewstep's Registry, and a short training run. Fast, seeded, CPU.

Everything from fewstep comes from ``fewstep.api``, like the plugin itself.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import fewstep_shortcut
from fewstep.api import (Batch, BuildContext, DataSpec, OptionError, RecipeError, Registry, Trainer, load_recipe,
                         recipe_from_dict)
from fewstep_shortcut import objective as shortcut_objective
from fewstep_shortcut.sampler import ShortcutSampler

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart_shortcut.toml"
NULL = 3
CTX = BuildContext(data=DataSpec((2, 4, 4), NULL))  # 3 classes, null class 3
DEFAULTS = {"bootstrap_share": 0.25, "min_log2": 0, "max_log2": 7, "time_dist": "uniform", "label_drop": 0.1}


def Shortcut(ctx, **overrides):
    """The objective with the declared defaults (test_registration pins DEFAULTS to the declarations); the class
    itself takes keyword-only options without defaults, so a default lives in one place."""
    return shortcut_objective.Shortcut(ctx, **{**DEFAULTS, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def registry():
    """fewstep's own plugins through their entry points, plus this package registered in-process.

    ``only=["fewstep"]`` selects by distribution name, so an installed fewstep-shortcut is not loaded
    a second time (that would be a duplicate registration of `shortcut`).
    """
    reg = Registry(only=["fewstep"])
    reg.register_plugin(fewstep_shortcut, name="shortcut-under-test")
    yield reg
    reg.unregister_plugin("shortcut-under-test")


# -- stub networks -------------------------------------------------------------------------------

def coef(t, g):
    """Per-row coefficients of the affine stub net(x, t, s, y) = A(t, g) x + C(t, g), g = t - s."""
    return 0.5 + 0.3 * t + 0.7 * g, 0.1 * t - 0.2 * g


class AffineNet(torch.nn.Module):
    """net(x, t, s, y) = w (A(t, t - s) x + C(t, t - s)), recording (t, s, y, training) of each call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t, s, y):
        self.calls.append((t.clone(), s.clone(), None if y is None else y.clone(), self.training))
        a, c = coef(t, t - s)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return self.w * (a.view(shape) * x + c.view(shape))


class ScaleNet(torch.nn.Module):
    """net(x, t, s, y) = a x, recording (x, t, s)."""

    def __init__(self, a=0.7):
        super().__init__()
        self.a = a
        self.calls = []

    def forward(self, x, t, s, y):
        self.calls.append((x.clone(), t.clone(), s.clone()))
        return self.a * x


def rows(v, x):
    return v.view(-1, *([1] * (x.ndim - 1)))


def closed_form_target(x, t, d):
    """(u(x, t, d) + u(x - d u(x, t, d), t - d, d)) / 2 for the affine stub, by hand."""
    a1, c1 = coef(t, d)
    a2, c2 = coef(t - d, d)
    a1, c1, a2, c2, d = (rows(v, x) for v in (a1, c1, a2, c2, d))
    u1 = a1 * x + c1
    x_mid = (1 - d * a1) * x - d * c1
    return 0.5 * (u1 + a2 * x_mid + c2)


# -- the objective ---------------------------------------------------------------------------------

def test_self_consistency_target_equals_the_closed_form():
    obj = Shortcut(CTX)
    net = AffineNet()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1.0, 0.5, 0.75, 0.25], dtype=torch.float64)
    d = torch.tensor([0.5, 0.25, 0.125, 1 / 128], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    got = obj.shortcut_target(net, x, t, d, y)
    torch.testing.assert_close(got, closed_form_target(x, t, d), rtol=1e-12, atol=1e-12)
    (t1, s1, y1, _), (t2, s2, y2, _) = net.calls
    assert torch.equal(t1, t) and torch.equal(s1, t - d)  # u(x_t, t, d): gap d
    assert torch.equal(t2, t - d) and torch.equal(s2, t - 2 * d)  # u(x_{t-d}, t - d, d): ends at t - 2d >= 0
    assert torch.equal(y1, y) and torch.equal(y2, y)
    assert not got.requires_grad  # a stop-gradient target


def test_loss_and_its_gradient_equal_the_closed_form():
    """Rows [:n_fm] flow matching at d = 0 against e - x0, rows [n_fm:] the step 2d against the target."""
    obj = Shortcut(CTX, label_drop=0.0)
    net = AffineNet()
    x0 = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    e = torch.randn_like(x0)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t_fm = torch.tensor([0.1, 0.4, 0.9, 0.6], dtype=torch.float64)
    t_sc = torch.tensor([1.0, 0.5], dtype=torch.float64)
    step_sc = torch.tensor([1.0, 0.25], dtype=torch.float64)  # trained steps 2d
    out = obj.loss_given(net, x0, y, e, t_fm, t_sc, step_sc, torch.zeros(4, dtype=torch.bool))
    out.loss.backward()

    t = torch.cat([t_fm, t_sc])
    d_row = torch.cat([torch.zeros(4, dtype=torch.float64), step_sc])
    x_t = rows(1 - t, x0) * x0 + rows(t, x0) * e
    a, c = coef(t, d_row)
    pred = rows(a, x0) * x_t + rows(c, x0)  # w = 1
    target = torch.cat([e[:4] - x0[:4], closed_form_target(x_t[4:], t_sc, step_sc / 2)])
    per_row = ((pred - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out.loss.detach(), per_row.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.metrics["fm_mse"], per_row[:4].mean())
    torch.testing.assert_close(out.metrics["sc_mse"], per_row[4:].mean())
    # d loss / d w with the target held fixed (pred is linear in w): the target carries no gradient
    grad = (2 * (pred - target) * pred).flatten(1).mean(1).mean()
    torch.testing.assert_close(net.w.grad, grad, rtol=1e-10, atol=1e-12)
    # the student call: every row at once, FM rows at s = t, SC rows at s = t - 2d
    t_st, s_st, y_st, _ = net.calls[-1]
    assert torch.equal(t_st, t) and torch.equal(s_st, t - d_row) and torch.equal(y_st, y)


def test_d0_rows_are_plain_flow_matching():
    obj = Shortcut(CTX, bootstrap_share=0.0, label_drop=0.0)
    net = ScaleNet()
    x0 = torch.randn(8, 2, 4, 4)
    out = obj.loss(net, Batch(x0, torch.arange(8) % 3), step=0)
    (x_t, t, s), = net.calls  # no teacher calls without self-consistency rows
    assert torch.equal(s, t)  # d = 0
    tb = rows(t, x0)
    e = (x_t - (1 - tb) * x0) / tb  # recover the noise from the path
    expected = ((0.7 * x_t - (e - x0)) ** 2).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    assert set(out.metrics) == {"fm_mse"}


def test_batch_split_labels_and_times():
    obj = Shortcut(CTX, label_drop=1.0)
    net = AffineNet()
    x0 = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    obj.loss(net, Batch(x0, y), step=0)
    (t1, s1, y1, _), (t2, s2, y2, _), (t, s, y_st, _) = net.calls  # two teacher calls, then the student
    n_fm, n_sc = obj.split(8)
    assert (n_fm, n_sc) == (6, 2)
    assert torch.equal(s[:n_fm], t[:n_fm])  # FM rows first, at d = 0
    step = t[n_fm:] - s[n_fm:]
    assert torch.all(step > 0)
    assert torch.equal(t1, t[n_fm:]) and torch.equal(t1 - s1, step / 2)  # teacher: half steps
    assert torch.equal(y_st[:n_fm], torch.full((n_fm,), NULL))  # label dropout on FM rows only
    assert torch.equal(y_st[n_fm:], y[n_fm:]) and torch.equal(y1, y[n_fm:]) and torch.equal(y2, y[n_fm:])


def test_self_consistency_times_lie_on_the_grid_of_the_step():
    obj = Shortcut(CTX, min_log2=0, max_log2=7)
    t, step = obj.sample_sc(20_000, "cpu")
    k = -torch.log2(step)
    assert torch.equal(k, k.round()) and set(k.long().tolist()) == set(range(0, 7))  # steps 1 .. 1/64, all used
    assert torch.all(t >= step) and torch.all(t <= 1)  # t - 2d = t - step >= 0
    j = t / step
    assert torch.equal(j, j.round())  # t on the multiples of the step
    ones = t[step == 1.0]
    assert torch.all(ones == 1.0)  # a full step starts at the noise
    t_fm = Shortcut(CTX, time_dist="grid", max_log2=3).sample_fm_t(1000, "cpu")
    assert set((t_fm * 8).tolist()) == set(float(i) for i in range(1, 9))


def test_teacher_runs_in_eval_mode_when_the_net_has_dropout():
    class DropNet(AffineNet):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

    obj = Shortcut(CTX, bootstrap_share=0.5)
    net = DropNet().train()
    obj.loss(net, Batch(torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), 0)
    assert [c[3] for c in net.calls] == [False, False, True] and net.training


def test_flow_map_and_velocity():
    obj = Shortcut(CTX)
    net = ScaleNet(0.5)
    x = torch.randn(3, 2, 4, 4)
    t, s = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.0, 0.25, 0.25])
    torch.testing.assert_close(obj.flow_map(net, x, t, s, None), x - rows(t - s, x) * 0.5 * x)
    torch.testing.assert_close(obj.velocity(net, x, t, None), 0.5 * x)
    assert torch.equal(net.calls[-1][2], t)  # velocity: s = t, i.e. d = 0


def test_bad_levels_are_refused():
    with pytest.raises(ValueError, match="min_log2"):
        Shortcut(CTX, min_log2=3, max_log2=3)


# -- the sampler -----------------------------------------------------------------------------------

@pytest.mark.parametrize("nfe, schedule", [
    (1, [(1.0, 0.0)]),
    (2, [(1.0, 0.5), (0.5, 0.0)]),
    (4, [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]),
])
def test_sampler_call_sequence(nfe, schedule):
    net = ScaleNet(0.5)
    noise = torch.randn(3, 2, 4, 4)
    x = ShortcutSampler(CTX).sample(Shortcut(CTX), net, noise, None, nfe)
    assert len(net.calls) == nfe  # one network evaluation per step
    got = []
    for _, t, s in net.calls:
        assert torch.all(t == t[0]) and torch.all(s == s[0])
        got.append((t[0].item(), s[0].item()))
    assert got == schedule
    torch.testing.assert_close(x, (1 - 0.5 / nfe) ** nfe * noise)  # x <- x - d u, u = 0.5 x


# -- registration ----------------------------------------------------------------------------------

def test_registration_in_process_and_options(registry):
    obj_spec = registry.get("objective", "shortcut")
    smp_spec = registry.get("sampler", "shortcut")
    assert obj_spec.package == "(in-process)" and obj_spec.extras["default_sampler"] == "shortcut"
    assert obj_spec.options.resolve({}) == DEFAULTS and smp_spec.options.resolve({}) == {}
    assert obj_spec.options.resolve({"bootstrap_share": 1})["bootstrap_share"] == 1.0  # int where float is declared
    with pytest.raises(OptionError, match="out of range"):
        obj_spec.options.resolve({"bootstrap_share": 1.5})
    with pytest.raises(OptionError) as exc:
        obj_spec.options.resolve({"time_dist": "gird"})
    assert exc.value.suggestion == "grid"
    with pytest.raises(OptionError) as exc:
        obj_spec.options.resolve({"bootstrap_shar": 0.5})
    assert exc.value.suggestion == "bootstrap_share"
    obj = obj_spec.build(CTX, **obj_spec.options.resolve({"max_log2": 5}))
    assert isinstance(obj, shortcut_objective.Shortcut) and obj.max_log2 == 5 and obj.null == NULL
    assert isinstance(smp_spec.build(CTX), ShortcutSampler)


def test_recipe_validates_and_defaults_to_the_shortcut_sampler(registry):
    r = load_recipe(RECIPE, registry=registry)
    assert r.objective.name == "shortcut" and r.objective.options == DEFAULTS and r.sampler.name == "shortcut"
    with pytest.raises(RecipeError, match="did you mean 'grid'|'grid'"):
        load_recipe(RECIPE, ["objective.time_dist=gird"], registry=registry)
    d = tiny_recipe()
    del d["sampler"]
    assert recipe_from_dict(d, registry=registry).sampler.name == "shortcut"  # the objective's default sampler


def test_installed_package_registers_through_the_entry_point():
    try:
        metadata.distribution("fewstep-shortcut")
    except metadata.PackageNotFoundError:
        pytest.skip("fewstep-shortcut is not installed (pip install -e examples/fewstep-shortcut)")
    reg = Registry()
    spec = reg.get("objective", "shortcut")
    assert (spec.package, spec.plugin) == ("fewstep-shortcut", "shortcut")
    assert reg.get("sampler", "shortcut").package == "fewstep-shortcut"
    assert not [f for f in reg.failures if f.plugin == "shortcut"]


def test_registration_module_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, fewstep_shortcut; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_plugin_api_mismatch_refuses_to_load():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    code = ("import fewstep.api\n"
            "fewstep.api.PLUGIN_API_VERSION = 2\n"
            "try:\n"
            "    import fewstep_shortcut\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "written for fewstep plugin API 1" in out.stdout and "provides API 2" in out.stdout, \
        out.stdout + out.stderr


# -- training --------------------------------------------------------------------------------------

def tiny_recipe():
    return {
        "name": "tiny-shortcut",
        "data": {"name": "digits", "limit": 64},
        "backbone": {"name": "dit", "size": "T/2", "hidden": 32, "depth": 1, "heads": 2},
        "objective": {"name": "shortcut"},
        "sampler": {"name": "shortcut"},
        "train": {"steps": 20, "batch": 16, "lr": 1e-3, "log_every": 1, "ema": [0.9], "seed": 3, "device": "cpu"},
        "eval": {"nfe": [1, 2], "grid": 4},
    }


def test_twenty_training_steps_on_digits(tmp_path, registry):
    recipe = recipe_from_dict(tiny_recipe(), registry=registry)
    res = Trainer(recipe, tmp_path / "run", show_progress=False, registry=registry).run()
    assert res.step == 20 and res.skipped_steps == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 21))
    for l in lines:
        for key in ("loss", "fm_mse", "sc_mse", "grad_norm"):
            assert math.isfinite(l[key]), (l["step"], key, l[key])
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == [
        "step_00000020_nfe1.png", "step_00000020_nfe2.png"]
