"""The training loop: bit-identical resume, non-finite steps, EMA, checkpoints, run folder."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fewstep
from fewstep.cli import app
from fewstep.engine import checkpoint as ckpt
from fewstep.engine.ema import EMA
from fewstep.engine.trainer import RunFolderError, Trainer, TrainingDiverged
from fewstep.interfaces import LossOutput
from fewstep.recipe import recipe_from_dict
from fewstep.registry import get_registry

from conftest import tiny_dict


def weights(run_dir):
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return load_file(latest / "model.safetensors"), load_file(latest / "ema.safetensors")


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_identical(tmp_path, tiny):
    r = tiny(train={"checkpoint_every": 3})
    Trainer(r, tmp_path / "straight", show_progress=False).run()
    Trainer(r, tmp_path / "split", show_progress=False).run(until_step=3)
    res = Trainer(r, tmp_path / "split", resume=True, show_progress=False).run()
    assert res.step == 6
    for a, b in zip(weights(tmp_path / "straight"), weights(tmp_path / "split")):
        assert_identical(a, b)
    # the optimizer really moved the weights (a no-op trainer would also be "identical")
    first = load_file(tmp_path / "split" / "checkpoints" / "step_00000003" / "model.safetensors")
    assert not torch.equal(first["final_layer.linear.weight"], weights(tmp_path / "split")[0]["final_layer.linear.weight"])


class Interrupting:
    """An in-process objective plugin that behaves like fm but raises KeyboardInterrupt at one step."""

    __name__ = "interrupting"
    at_step = None

    @fewstep.hookimpl
    def register_objectives(register):
        def build(ctx, **opts):
            from fewstep_plugins.fm.objective import FlowMatching

            class Obj(FlowMatching):
                def loss(self, net, batch, step):
                    if step == Interrupting.at_step:
                        raise KeyboardInterrupt
                    return super().loss(net, batch, step)

            return Obj(ctx, **opts)

        from fewstep_plugins.fm import FM_OPTIONS

        register("fm-interrupt", build, default_sampler="ode", options=FM_OPTIONS)


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, registry):
    registry.register_plugin(Interrupting, name="interrupting")
    d = tiny_dict(objective={"name": "fm-interrupt"}, train={"checkpoint_every": 2})
    r = recipe_from_dict(d)
    Interrupting.at_step = None
    Trainer(r, tmp_path / "straight", show_progress=False).run()
    Interrupting.at_step = 5  # dies in the middle of step 5, after the checkpoint at 4
    with pytest.raises(KeyboardInterrupt):
        Trainer(r, tmp_path / "killed", show_progress=False).run()
    assert ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_00000004"
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp*"))
    Interrupting.at_step = None
    Trainer(r, tmp_path / "killed", resume=True, show_progress=False).run()
    for a, b in zip(weights(tmp_path / "straight"), weights(tmp_path / "killed")):
        assert_identical(a, b)


class NaNAt:
    __name__ = "nan-at"
    steps: set = set()

    @fewstep.hookimpl
    def register_objectives(register):
        def build(ctx, **opts):
            from fewstep_plugins.fm.objective import FlowMatching

            class Obj(FlowMatching):
                def loss(self, net, batch, step):
                    out = super().loss(net, batch, step)
                    if step in NaNAt.steps:
                        return LossOutput(out.loss * float("nan"), out.metrics)
                    return out

            return Obj(ctx, **opts)

        from fewstep_plugins.fm import FM_OPTIONS

        register("fm-nan", build, default_sampler="ode", options=FM_OPTIONS)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, registry):
    registry.register_plugin(NaNAt, name="nan-at")
    NaNAt.steps = {2, 3}
    r = recipe_from_dict(tiny_dict(objective={"name": "fm-nan"}))
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert res.skipped_steps == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_steps"] == 2 and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    # a window of only skipped steps logs no (stale) loss, and says so
    assert [x["step"] for x in lines if "loss" not in x] == [3, 4]
    assert all(x["skipped_in_window"] == 1 for x in lines if "loss" not in x)
    model, _ = weights(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in model.values())


def test_several_non_finite_steps_in_a_row_stop_the_run(tmp_path, registry):
    registry.register_plugin(NaNAt, name="nan-at")
    NaNAt.steps = {3, 4, 5}
    r = recipe_from_dict(tiny_dict(objective={"name": "fm-nan"}, train={"max_bad_steps": 3, "checkpoint_every": 2, "steps": 10}))
    with pytest.raises(TrainingDiverged) as exc:
        Trainer(r, tmp_path / "run", show_progress=False).run()
    msg = str(exc.value)
    assert "step 6" in msg and "step_00000002" in msg


def test_ema_matches_closed_form():
    net = torch.nn.Linear(3, 1, bias=False)
    w0 = net.weight.detach().clone()
    ema = EMA(net, [0.9, 0.5], every=1)
    with torch.no_grad():
        net.weight.fill_(2.0)  # constant weights from now on
    for step in range(1, 8):
        ema.update(net, step)
    for i, d in enumerate([0.9, 0.5]):
        expected = d ** 7 * w0 + (1 - d ** 7) * 2.0
        torch.testing.assert_close(ema.shadows[i]["weight"], expected)


def test_ema_every_16_equals_16_single_steps():
    """CIFAR recipes: decay**16 every 16 steps, the power taken in float64, equals 16 exact single steps."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    w0 = {k: v.detach().double().clone() for k, v in net.state_dict().items()}
    a = EMA(net, [0.9999], every=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for step in range(1, 17):
        a.update(net, step)
    for k, v in net.state_dict().items():
        exact = w0[k]  # 16 single float64 steps
        for _ in range(16):
            exact = 0.9999 * exact + (1 - 0.9999) * v.double()
        torch.testing.assert_close(a.shadows[0][k].double(), exact, atol=1e-7, rtol=0)


def test_ema_every_n_accumulates_in_float64_like_the_official_code():
    """every > 1: e <- D e + (1 - D) w in float64, stored as float32 (SoFlow train.py, py-meanflow ema.py): equal
    bit for bit to that formula, and not to the float32 update (the test can tell the two apart)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    ema = EMA(net, [0.9999], every=16)
    ref = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    f32 = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    D = 0.9999 ** 16
    for step in range(1, 16 * 40 + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        ema.update(net, step)
        if step % 16 == 0:
            for k, v in net.state_dict().items():
                ref[k] = (D * ref[k].double() + (1 - D) * v.double()).float()
                f32[k].mul_(D).add_(v, alpha=1 - D)
    for k in ref:
        assert torch.equal(ema.shadows[0][k], ref[k]), k
    assert any(not torch.equal(ref[k], f32[k]) for k in ref)  # float32 accumulation rounds differently


def test_ema_offset_1_is_soflows_cifar_timing():
    """SoFlow train.py tests finished_steps % 16 == 0 before incrementing it: updates after optimizer steps 1, 17,
    33, ... with 0.9999**16 each; offset 0 (py-meanflow) updates after 16, 32, ... The two differ, each equals its
    official loop restated in float64."""
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8)
    w0 = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    emas = {o: EMA(net, [0.9999], every=16, offset=o) for o in (0, 1)}
    refs = {o: {k: v.clone() for k, v in w0.items()} for o in (0, 1)}
    updated = {0: [], 1: []}
    D = 0.9999 ** 16
    finished = 0  # SoFlow's counter
    for step in range(1, 50):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1e-2 * torch.randn_like(p))
        for o, e in emas.items():
            before = {k: v.clone() for k, v in e.shadows[0].items()}
            e.update(net, step)
            if any(not torch.equal(before[k], e.shadows[0][k]) for k in before):
                updated[o].append(step)
        w = net.state_dict()
        if finished % 16 == 0:  # SoFlow: before the increment
            refs[1] = {k: (D * refs[1][k].double() + (1 - D) * w[k].double()).float() for k in w}
        finished += 1
        if step % 16 == 0:  # py-meanflow update_ema_net(period=16)
            refs[0] = {k: (D * refs[0][k].double() + (1 - D) * w[k].double()).float() for k in w}
    assert updated == {0: [16, 32, 48], 1: [1, 17, 33, 49]}
    for o in (0, 1):
        assert all(torch.equal(emas[o].shadows[0][k], refs[o][k]) for k in w0)
    res = CliRunner().invoke(app, ["check", "recipes/quickstart.toml", "--set", "train.ema_offset=1"])
    assert res.exit_code == 2 and "train.ema_offset" in res.output and "below train.ema_every = 1" in res.output


def test_halflife_ema_is_edms_rule():
    """EDM training_loop.py: beta = 0.5 ** (B / max(min(H, rampup * nimg_before), 1e-8)), ema = lerp(w, ema, beta),
    restated in float64 step by step; the first update copies the weights; the 500 kimg half-life at batch 512 is
    the constant 0.5 ** (512 / 5e5) = 0.999290 once the ramp-up is over (10 Mimg = 19532 updates)."""
    from fewstep.engine.ema import halflife_beta

    assert halflife_beta(1, 500, 0.05, 512) == 0.0
    assert halflife_beta(2, 500, 0.05, 512) == 0.5 ** (512 / (512 * 0.05))  # 0.5 ** 20
    assert halflife_beta(30_000, 500, 0.05, 512) == pytest.approx(0.9992904, abs=1e-7)
    assert halflife_beta(2, 500, 0.0, 512) == 0.5 ** (512 / 5e5)  # no ramp-up
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8)
    B, H, r = 4, 0.1, 0.5  # half-life 100 images, ramped up over the first 200 images = 50 updates
    ema = EMA(net, [0.9], halflife_kimg=[H], rampup=r, batch=B)
    ref = None
    for step in range(1, 81):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema.update(net, step)
        w = {k: v.detach().double() for k, v in net.state_dict().items()}
        h = min(H * 1000, (step - 1) * B * r)
        beta = 0.5 ** (B / max(h, 1e-8))
        ref = dict(w) if ref is None else {k: w[k] + beta * (ref[k] - w[k]) for k in w}
        if step == 1:
            assert all(torch.equal(ema.shadows[0][k], net.state_dict()[k]) for k in w)  # beta = 0: a copy
    for k in ref:
        torch.testing.assert_close(ema.shadows[0][k].double(), ref[k], atol=2e-6, rtol=0)
    assert ema.decay(1, 80) == 0.9  # the constant copy comes after the half-life copy
    # every = N: the product of the N betas of its steps
    e4 = EMA(net, [], every=4, halflife_kimg=[H], rampup=r, batch=B)
    assert e4.decay(0, 8) == pytest.approx(math.prod(halflife_beta(k, H, r, B) for k in range(5, 9)), rel=1e-15)


def test_halflife_ema_copies_in_a_run_and_in_the_recipe(tmp_path, tiny):
    r = tiny(train={"steps": 1, "ema": [0.5], "ema_halflife_kimg": [500]})
    Trainer(r, tmp_path / "run", show_progress=False).run()
    root = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    model, ema = load_file(root / "model.safetensors"), load_file(root / "ema.safetensors")
    assert all(torch.equal(ema[f"ema0.{k}"], v.float()) for k, v in model.items())  # first update: beta = 0
    assert not all(torch.equal(ema[f"ema1.{k}"], v.float()) for k, v in model.items())  # the 0.5 copy
    from fewstep.engine.ema import ema_labels
    assert ema_labels(r.train) == ["500 kimg half-life (ramp-up 0.05)", "0.5"]
    from fewstep.runs import load_model
    first, second = load_model(tmp_path / "run", 0, "cpu"), load_model(tmp_path / "run", 1, "cpu")
    assert (first.ema_label, first.ema_decay) == ("500 kimg half-life (ramp-up 0.05)", None)
    assert (second.ema_label, second.ema_decay) == ("0.5", 0.5)
    assert torch.equal(next(first.net.parameters()).detach(), load_file(root / "model.safetensors")[
        next(iter(dict(first.net.named_parameters())))])
    res = CliRunner().invoke(app, ["check", "recipes/quickstart.toml", "--set", "train.ema=[]"])
    assert res.exit_code == 2 and "train.ema" in res.output and "no EMA copy" in res.output


def test_checkpoint_layout_and_safe_loading(tmp_path, tiny):
    r = tiny(train={"checkpoint_every": 2, "keep_checkpoints": 2})
    Trainer(r, tmp_path / "run", show_progress=False).run()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    state = torch.load(root / "step_00000006" / "state.pt", weights_only=True)  # no arbitrary unpickling
    assert state["step"] == 6
    ema = load_file(root / "step_00000006" / "ema.safetensors")
    assert any(k.startswith("ema1.") for k in ema)  # two decays -> two copies
    assert (tmp_path / "run" / "recipe.toml").read_text().count("[train]") == 1
    assert (tmp_path / "run" / "samples" / "step_00000006_nfe1.png").is_file()


def test_run_folder_is_not_silently_overwritten_and_resume_checks_the_recipe(tmp_path, tiny):
    Trainer(tiny(), tmp_path / "run", show_progress=False).run()
    with pytest.raises(RunFolderError, match="--resume"):
        Trainer(tiny(), tmp_path / "run", show_progress=False).run()
    with pytest.raises(RunFolderError, match="train.lr"):
        Trainer(tiny(train={"lr": 0.5}), tmp_path / "run", resume=True, show_progress=False).run()


def test_cli_train_tiny_and_sample(tmp_path):
    import tomli_w

    p = tmp_path / "tiny.toml"
    p.write_text(tomli_w.dumps(tiny_dict()))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(p), "--out", str(tmp_path / "run"), "--set", "train.steps=4"], prog_name="fewstep")
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    res = runner.invoke(app, ["sample", str(tmp_path / "run"), "--num", "10", "--out", str(tmp_path / "s.npz")], prog_name="fewstep")
    assert res.exit_code == 0, res.output
    import numpy as np

    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:  # ADM's evaluator input: images NHWC, labels
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.shape == (10, 8, 8, 1) and arr.dtype == np.uint8
    assert labels.shape == (10,) and labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < 10
    res = runner.invoke(app, ["train", str(p), "--out", str(tmp_path / "run")], prog_name="fewstep")
    assert res.exit_code == 2 and "--resume" in res.output


def test_latest_pointer_must_name_a_checkpoint_inside_the_run(tmp_path, tiny):
    r = tiny(train={"checkpoint_every": 2})
    Trainer(r, tmp_path / "run", show_progress=False).run()
    root = tmp_path / "run" / "checkpoints"
    outside = tmp_path / "elsewhere"
    (outside / "step_99999999").mkdir(parents=True)
    (outside / "step_99999999" / "meta.json").write_text('{"step": 99999999}')
    for bad in ("../elsewhere/step_99999999", "/etc", "step_00000002/../../../elsewhere/step_99999999"):
        (root / "latest").write_text(bad + "\n")
        assert ckpt.latest_checkpoint(root) == root / "step_00000006"  # the newest complete one inside instead


def test_skipped_steps_survive_a_resume_and_a_skipped_end_reports_no_stale_loss(tmp_path, registry):
    registry.register_plugin(NaNAt, name="nan-at")
    NaNAt.steps = {1, 3, 4, 5}  # 0-based steps: finished steps 2, 4, 5 and 6 are skipped
    r = recipe_from_dict(tiny_dict(objective={"name": "fm-nan"}, train={"checkpoint_every": 3, "log_every": 3}))
    Trainer(r, tmp_path / "run", show_progress=False).run(until_step=3)
    res = Trainer(r, tmp_path / "run", resume=True, show_progress=False).run()
    assert res.skipped_steps == 4  # 1 before the resume + 3 after
    assert res.final_metrics_step == 3 and res.step == 6  # steps 4-6 all skipped: the last finite window is step 3's
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6] and "loss" not in lines[-1] and lines[-1]["skipped_steps"] == 4


def test_set_overrides_top_level_keys(tmp_path):
    import tomli_w

    from fewstep.recipe import load_recipe

    p = tmp_path / "r.toml"
    p.write_text(tomli_w.dumps(tiny_dict()))
    r = load_recipe(p, ["name=renamed", "description=a test"])
    assert r.name == "renamed" and r.description == "a test"


def test_the_summary_shows_the_objectives_headline_metric_and_help_shows_default_paths(tmp_path):
    """Under adaptive weighting the loss sits near 1 whatever the error: the bar and the final table show the
    objective's headline metric (SoFlow: fm_mse) beside it. `--help` keeps its [default: ...] text."""
    import tomli_w

    p = tmp_path / "s.toml"
    p.write_text(tomli_w.dumps(tiny_dict(objective={"name": "soflow", "fm_ratio": 0.5}, train={"steps": 2})))
    res = CliRunner().invoke(app, ["train", str(p), "--out", str(tmp_path / "run")], prog_name="fewstep")
    assert res.exit_code == 0, res.output
    assert "fm_mse (headline)" in res.output
    from fewstep.registry import Registry

    for name, key in [("soflow", "fm_mse"), ("meanflow", "mse"), ("ect", "ect_d"), ("fm", "fm_mse")]:
        cls = Registry().get("objective", name).load()
        assert cls.headline_metric == key
    for cmd, text in [("train", "[default: runs/<recipe name>]"), ("sample", "[default: RUN/samples/sample_nfe<NFE>.png]")]:
        out = " ".join(CliRunner().invoke(app, [cmd, "--help"], prog_name="fewstep").output.split())
        assert text in out.replace("│ ", "").replace(" │", ""), out


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_train_compile_mode_reaches_torch_compile(mode, tmp_path, monkeypatch):
    """`train.compile_mode` is the mode torch.compile gets (the backbone only); the bench's bare step uses it too."""
    from conftest import tiny_dict
    from fewstep.bench import bare_step
    from fewstep.recipe import recipe_from_dict

    seen = []

    def fake_compile(module, **kw):
        seen.append((type(module).__name__, kw.get("mode")))
        return module  # eager: what is tested is the call, not inductor

    monkeypatch.setattr(torch, "compile", fake_compile)
    r = recipe_from_dict(tiny_dict(train={"steps": 2, "compile": True, "compile_mode": mode}))
    Trainer(r, tmp_path / "run", show_progress=False).run()
    bare_step(r, steps=1, warmup=1, device=torch.device("cpu"), flop_steps=1)
    assert seen and all(m == mode for _, m in seen)
    assert seen[0][0] == "DiT" and len(seen) == 2


def test_train_compile_mode_must_be_a_torch_mode():
    from conftest import tiny_dict
    from fewstep.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="compile_mode"):
        recipe_from_dict(tiny_dict(train={"compile_mode": "fast"}))
