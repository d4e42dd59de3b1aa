"""ECT: EDM parameterisation and conventions, the (t, r) schedules, the loss against closed forms,
teacher without gradient and with the student's dropout masks, the sampler, and init_from."""
import math

import pytest
import torch
from safetensors.torch import load_file

from fewstep.engine import checkpoint as ckpt
from fewstep.engine.trainer import Trainer
from fewstep.interfaces import Batch, BuildContext, DataSpec
from fewstep.recipe import recipe_from_dict
from fewstep.registry import get_registry
from fewstep_plugins.ect.objective import ect_r, ect_stage, ict_num_points
from fewstep_plugins.ect.precond import (EDMPrecond, fm_to_ve, karras_sigmas, lognormal_interval_probs, sigma_to_t,
                                         t_to_sigma, ve_to_fm)
from conftest import builtin

ECT = builtin("objective", "ect")
ECTSampler = builtin("sampler", "ect")

from conftest import tiny_dict

CTX = BuildContext(data=DataSpec((1, 4, 4), 3), train_steps=100)
SD, SMIN, SMAX = 0.5, 0.002, 80.0
# the mapping's official constants (q 2, k 8, b 1, sigmoid) and iCT's s0 10, s1 1280, as declared once
DECLARED = get_registry().get("objective", "ect").options.resolve({})
MAP = {k: DECLARED[k] for k in ("q", "k", "b", "mapping")}
S01 = (DECLARED["s0"], DECLARED["s1"])


class Recorder(torch.nn.Module):
    """net(x, t, s, y) = a x + bias * t (a per-sample affine map), recording every call."""

    def __init__(self, a=0.7, bias=0.3):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.bias = torch.nn.Parameter(torch.tensor(bias))
        self.calls = []

    def forward(self, x, t, s, y):
        self.calls.append((x.detach().clone(), t.clone(), s.clone()))
        return self.a * x + self.bias * t.view(-1, 1, 1, 1)


class TinyNet(torch.nn.Module):
    """A small MLP backbone with optional dropout: net(x, t, s, y)."""

    def __init__(self, dim=16, p=0.0):
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 2, 32)
        self.l2 = torch.nn.Linear(32, dim)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, t, s, y):
        h = torch.cat([x.flatten(1), t[:, None], (t - s)[:, None]], 1)
        return self.l2(self.drop(torch.tanh(self.l1(h)))).view_as(x)


def coeffs(sigma, training):
    """EDM/ECM coefficients written out independently of the plugin."""
    eff = sigma if training else sigma - SMIN
    return SD ** 2 / (eff ** 2 + SD ** 2), eff * SD / math.sqrt(sigma ** 2 + SD ** 2), 1 / math.sqrt(sigma ** 2 + SD ** 2)


# -- conventions and preconditioning -------------------------------------------------------------

def test_sigma_t_and_x_conversions_round_trip():
    sigma = torch.tensor([0.002, 0.1, 0.821, 1.0, 5.0, 80.0], dtype=torch.float64)
    t = sigma_to_t(sigma)
    torch.testing.assert_close(t_to_sigma(t), sigma, rtol=1e-12, atol=0)
    assert t[3] == 0.5 and sigma_to_t(torch.tensor([math.inf]))[0] == 1.0
    x0 = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    e = torch.randn_like(x0)
    x_ve = x0 + sigma.view(-1, 1, 1, 1) * e
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(ve_to_fm(x_ve, sigma), (1 - tb) * x0 + tb * e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fm_to_ve(ve_to_fm(x_ve, sigma), sigma), x_ve, rtol=1e-12, atol=1e-12)


def test_train_mode_coefficients_match_closed_form():
    pc = EDMPrecond(SD, SMIN, SMAX)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    for training in (True, False):
        c_skip, c_out, c_in = pc.coefficients(sigma, training)
        for i, s in enumerate(sigma.tolist()):
            ref = coeffs(s, training)
            torch.testing.assert_close(torch.stack([c_skip[i], c_out[i], c_in[i]]),
                                       torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    c_skip, c_out, c_in = pc.coefficients(torch.tensor([0.5], dtype=torch.float64), True)
    assert c_skip.item() == pytest.approx(0.5) and c_out.item() == pytest.approx(0.25 / math.sqrt(0.5))


def test_eval_boundary_is_exact_and_train_mode_is_not():
    pc = EDMPrecond(SD, SMIN, SMAX)
    net = TinyNet()
    x = torch.randn(5, 1, 4, 4)
    sigma = torch.full((5,), SMIN)
    net.eval()
    assert torch.equal(pc.denoise(net, x, sigma, None), x)
    net.train()
    assert not torch.equal(pc.denoise(net, x, sigma, None), x)


@pytest.mark.parametrize("noise_input, sigmas, time_of", [
    ("fm", [0.1, 1.0, 20.0], lambda sg: sg / (1 + sg)),  # t_fm = sigma / (1 + sigma)
    ("edm", [0.002, 1.0, 80.0], lambda sg: math.log(sg) / 4),  # EDM's c_noise (training/networks.py:713)
])
def test_denoiser_feeds_the_backbone_c_in_x_and_the_noise_input_for_both_times(noise_input, sigmas, time_of):
    """Both time inputs get the same value (t_fm, or ln(sigma) / 4 with noise_input = "edm"); the coefficients do
    not depend on the noise input."""
    pc = EDMPrecond(SD, SMIN, SMAX, noise_input)
    net = Recorder().train()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    out = pc.denoise(net, x, sigma, None)
    (xin, t, s), = net.calls
    assert torch.equal(t, s)
    torch.testing.assert_close(t, torch.tensor([time_of(sg) for sg in sigmas], dtype=torch.float64))
    for i, sg in enumerate(sigmas):
        c_skip, c_out, c_in = coeffs(sg, True)
        torch.testing.assert_close(xin[i], c_in * x[i])
        torch.testing.assert_close(out[i], c_skip * x[i] + c_out * (0.7 * c_in * x[i] + 0.3 * time_of(sg)))


def test_noise_input_reaches_the_denoiser_from_the_objective_options():
    from fewstep.api import Registry

    spec = Registry().get("objective", "ect")
    ctx = BuildContext(data=DataSpec((1, 4, 4), 0))
    assert spec.create(ctx, noise_input="edm").precond.noise_input == "edm"
    assert spec.create(ctx).precond.noise_input == "fm"  # the default: what an init_from flow-matching run saw

# -- (t, r) schedules -------------------------------------------------------------------------------

def test_ect_r_schedule_values():
    t = torch.tensor([0.05, 0.5, 3.0, 80.0], dtype=torch.float64)
    r0 = ect_r(t, 0, **MAP)
    assert r0[0] == 0 and r0[1] == 0  # stage 0: small t clamps to r = 0 (a denoising target)
    assert r0[2].item() == pytest.approx(0.931, abs=1e-3)
    assert r0[3].item() == pytest.approx(40.0, rel=1e-12)
    for stage in (0, 1, 2):
        expected = [max(0.0, tt * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + math.exp(tt))))) for tt in t.tolist()]
        torch.testing.assert_close(ect_r(t, stage, **MAP), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert ect_r(torch.tensor([80.0]), 1, **MAP).item() == pytest.approx(60.0)
    assert ect_r(torch.tensor([80.0]), 2, **MAP).item() == pytest.approx(70.0)
    assert [ect_stage(s, 25_000) for s in (0, 24_999, 25_000, 50_000)] == [0, 0, 1, 2]


def test_ect_const_mapping_is_the_official_t_to_r_const():
    t = torch.tensor([0.05, 0.5, 3.0, 80.0], dtype=torch.float64)
    for stage in (0, 1, 3):
        torch.testing.assert_close(ect_r(t, stage, **{**MAP, "mapping": "const"}), t * (1 - 2.0 ** -(stage + 1)), rtol=1e-15, atol=0)
    obj = ECT(CTX, mapping="const", q=4.0, double_every=10)
    torch.manual_seed(1)
    tt, r = obj.sample_t_r(500, step=10, device="cpu")  # stage 1: r = t (1 - 1/16)
    torch.testing.assert_close(r, tt * (1 - 4.0 ** -2))
    with pytest.raises(ValueError, match="mapping"):
        ect_r(t, 0, **{**MAP, "mapping": "linear"})


def test_ect_sample_t_r_follows_the_stage():
    obj = ECT(CTX, double_every=10)
    torch.manual_seed(1)
    t, r = obj.sample_t_r(1000, step=25, device="cpu")  # stage 2
    torch.testing.assert_close(r, ect_r(t, 2, **MAP))
    assert (r < t).all() and (r >= 0).all()
    assert abs(t.log().mean().item() + 1.1) < 0.2 and abs(t.log().std().item() - 2.0) < 0.2


def test_ict_curriculum_and_discretised_lognormal():
    K = 8000  # K' = floor(8000 / (log2(128) + 1)) = 1000
    assert ict_num_points(0, K, *S01) == 11  # s0 = 10 intervals
    assert ict_num_points(999, K, *S01) == 11 and ict_num_points(1000, K, *S01) == 21
    assert ict_num_points(7000, K, *S01) == 1281 and ict_num_points(K, K, *S01) == 1281  # capped at s1 + 1
    for n in (11, 161, 1281):
        sig = karras_sigmas(n, SMIN, SMAX, 7.0)
        assert sig[0].item() == pytest.approx(SMIN) and sig[-1].item() == pytest.approx(SMAX)
        p = lognormal_interval_probs(sig, -1.1, 2.0)
        assert p.shape == (n - 1,) and (p > 0).all()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    obj = ECT(CTX, schedule="ict", total_steps=K)
    t, r = obj.sample_t_r(500, step=0, device="cpu")
    grid = karras_sigmas(11, SMIN, SMAX, 7.0).float()
    idx = torch.searchsorted(grid, r)
    torch.testing.assert_close(r, grid[idx])
    torch.testing.assert_close(t, grid[idx + 1])
    assert ECT(BuildContext(train_steps=800), schedule="ict").total_steps == 800  # 0 -> train.steps


# -- loss ---------------------------------------------------------------------------------------------

def draw(obj, x0, seed, step):
    """Replay the objective's random draws: t (and r), then the shared noise."""
    torch.manual_seed(seed)
    t, r = obj.sample_t_r(x0.shape[0], step, x0.device)
    return t, r, torch.randn_like(x0)


@pytest.mark.parametrize("c", [0.0, 0.03])
def test_loss_equals_closed_form_with_a_stub(c):
    obj = ECT(CTX, c=c, double_every=1, grad_nan_to_num=False)
    net = Recorder().train()
    torch.manual_seed(0)
    x0 = torch.randn(8, 1, 4, 4)
    torch.manual_seed(7)
    out = obj.loss(net, Batch(x0, None), step=0)
    t, r, e = draw(obj, x0, 7, 0)
    assert (r == 0).any() and (r > 0).any()  # both kinds of rows in this batch
    loss_i = []
    for i in range(8):
        ti, ri = t[i].item(), r[i].item()

        def D(x, s):
            c_skip, c_out, c_in = coeffs(s, True)
            return c_skip * x + c_out * (0.7 * c_in * x + 0.3 * s / (1 + s))

        d_t = D(x0[i] + ti * e[i], ti)
        d_r = D(x0[i] + ri * e[i], ri) if ri > 0 else x0[i]
        d = ((d_t - d_r) ** 2).sum()
        loss_i.append((torch.sqrt(d + c ** 2) - c) / (ti - ri))
    torch.testing.assert_close(out.loss, torch.stack(loss_i).mean(), rtol=1e-5, atol=1e-6)
    assert out.metrics["ect_r0_frac"].item() == pytest.approx((r == 0).float().mean().item())
    torch.testing.assert_close(out.metrics["ect_gap"], (t - r).mean())


def test_no_gradient_flows_through_the_teacher():
    obj = ECT(CTX, double_every=1, grad_nan_to_num=False)
    net = TinyNet().train()
    x0 = torch.randn(16, 1, 4, 4)
    step = 3  # late stage: every row has r > 0, so every row has a network teacher
    torch.manual_seed(11)
    obj.loss(net, Batch(x0, None), step).loss.backward()
    ours = [p.grad.clone() for p in net.parameters()]

    def explicit(detach):
        net.zero_grad()
        t, r, e = draw(obj, x0, 11, step)
        assert (r > 0).all()
        d_t = obj.denoise(net, x0 + t.view(-1, 1, 1, 1) * e, t, None)
        d_r = obj.denoise(net, x0 + r.view(-1, 1, 1, 1) * e, r, None)
        if detach:
            d_r = d_r.detach()
        d = ((d_t - d_r) ** 2).flatten(1).sum(1)
        (d.sqrt() / (t - r)).mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    for a, b in zip(ours, explicit(detach=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(ours, explicit(detach=False)))


def test_teacher_reuses_the_student_dropout_masks(monkeypatch):
    obj = ECT(CTX, grad_nan_to_num=False)
    net = TinyNet(p=0.5).train()
    outs = []
    net.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    x0 = torch.randn(6, 1, 4, 4)
    t = torch.full((6,), 1.3)
    monkeypatch.setattr(obj, "sample_t_r", lambda n, step, device: (t, t.clone()))  # x_r = x_t, r = t
    out = obj.loss(net, Batch(x0, None), 0)
    student, teacher = outs
    assert torch.equal(student, teacher)
    assert out.metrics["ect_d"].item() == 0.0
    outs.clear()
    net(x0, t, t, None), net(x0, t, t, None)  # without the replay, two forwards draw different masks
    assert not torch.equal(*outs)


def test_gradients_pass_through_nan_to_num():
    class NaNGrad(torch.nn.Module):
        """Finite output whose gradient w.r.t. w is 0 * inf = nan."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.5))
            self.w = torch.nn.Parameter(torch.tensor(0.0))

        def forward(self, x, t, s, y):
            return self.a * x + 0.0 * torch.sqrt(self.w)

    for on in (True, False):
        net = NaNGrad().train()
        obj = ECT(CTX, grad_nan_to_num=on)
        for _ in range(2):  # the hook is registered once, however many steps run
            net.zero_grad()
            obj.loss(net, Batch(torch.randn(4, 1, 4, 4), None), 0).loss.backward()
        assert torch.isfinite(net.a.grad)
        assert (net.w.grad.item() == 0.0) if on else torch.isnan(net.w.grad)
    assert len(net.w._backward_hooks or {}) == 0
    net = NaNGrad()
    obj = ECT(CTX)
    obj.loss(net, Batch(torch.randn(4, 1, 4, 4), None), 0)
    obj.loss(net, Batch(torch.randn(4, 1, 4, 4), None), 0)
    assert len(net.w._backward_hooks) == 1


# -- fewstep convention: flow_map / velocity ----------------------------------------------------------

class Oracle(torch.nn.Module):
    """A backbone whose eval-mode ECM denoiser returns a fixed x0 exactly (a point-mass data set)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, u, t, s, y):
        sigma = (t / (1 - t)).view(-1, 1, 1, 1)
        root = torch.sqrt(sigma ** 2 + SD ** 2)
        x = u * root
        eff = sigma - SMIN
        c_skip, c_out = SD ** 2 / (eff ** 2 + SD ** 2), eff * SD / root
        return (self.x0 - c_skip * x) / c_out


def test_flow_map_and_velocity_in_the_core_convention():
    torch.set_default_dtype(torch.float64)
    try:
        x0 = torch.randn(1, 1, 4, 4).expand(4, 1, 4, 4)
        net = Oracle(x0).eval()
        obj = ECT(CTX)
        e = torch.randn(4, 1, 4, 4)
        t = torch.tensor([1.0, 0.9, 0.5, 0.1])
        s = torch.tensor([0.0, 0.3, 0.5, 0.05])
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * e
        x_s = obj.flow_map(net, x_t, t, s, None)
        torch.testing.assert_close(x_s, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * e, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(obj.velocity(net, x_t, t, None), e - x0, rtol=1e-9, atol=1e-9)
        # t = 1 is read at sigma_max: x_ve = 80 e, where the sampler starts
        x_ve, sigma = obj.to_ve(e, torch.ones(4))
        torch.testing.assert_close(x_ve, 80 * e)
        torch.testing.assert_close(sigma, torch.full((4,), 80.0))
    finally:
        torch.set_default_dtype(torch.float32)


# -- sampler --------------------------------------------------------------------------------------------

def test_two_step_sampler_call_sequence_and_renoise():
    obj = ECT(CTX)
    net = Recorder(a=0.0, bias=0.0).eval()  # F = 0: D(x, sigma) = c_skip(sigma) x
    noise = torch.randn(3, 1, 4, 4)
    out = ECTSampler(CTX).sample(obj, net, noise, None, nfe=2, generator=torch.Generator().manual_seed(5))
    assert len(net.calls) == 2
    (x1, t1, s1), (x2, t2, s2) = net.calls
    torch.testing.assert_close(t1, torch.full((3,), 80 / 81))
    torch.testing.assert_close(t2, torch.full((3,), 0.821 / 1.821))
    assert torch.equal(s1, t1) and torch.equal(s2, t2)
    skip80, _, cin80 = coeffs(80.0, False)
    skipm, _, cinm = coeffs(0.821, False)
    torch.testing.assert_close(x1, cin80 * 80 * noise)
    e2 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    x_mid = skip80 * 80 * noise + 0.821 * e2  # denoise, then re-noise to 0.821 with fresh noise
    torch.testing.assert_close(x2, cinm * x_mid)
    torch.testing.assert_close(out, skipm * x_mid)
    again = ECTSampler(CTX).sample(obj, net, noise, None, nfe=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


def test_sampler_levels():
    s = ECTSampler(CTX)
    assert s.sigmas(1, 80.0) == [80.0]
    assert s.sigmas(2, 80.0) == [80.0, 0.821]
    three = s.sigmas(3, 80.0)
    assert three[2] == pytest.approx(0.821) and three[1] == pytest.approx(math.sqrt(80 * 0.821))
    assert ECTSampler(CTX, mid_sigmas=[5.0, 0.5]).sigmas(3, 80.0) == [80.0, 5.0, 0.5]
    with pytest.raises(ValueError):
        ECTSampler(CTX, mid_sigmas=[0.5, 5.0]).sigmas(3, 80.0)
    net = Recorder(a=0.0, bias=0.0).eval()
    ECTSampler(CTX).sample(ECT(CTX), net, torch.randn(2, 1, 4, 4), None, nfe=4)
    assert len(net.calls) == 4


# -- registration and init_from -----------------------------------------------------------------------

def test_registration_defaults():
    reg = get_registry()
    spec = reg.get("objective", "ect")
    opts = spec.options.resolve({})
    assert opts["double_every"] == 25_000 and opts["q"] == 2.0 and opts["k"] == 8.0 and opts["c"] == 0.0
    assert reg.get("sampler", "ect").options.resolve({})["mid_sigmas"] == [0.821]
    r = recipe_from_dict(tiny_dict(objective={"name": "ect"}))
    assert r.sampler.name == "ect"


def test_init_from_loads_the_fm_run_ema_on_fresh_runs_only(tmp_path, monkeypatch):
    fm = recipe_from_dict(tiny_dict(train={"steps": 2}))
    Trainer(fm, tmp_path / "fm", show_progress=False).run()
    latest = ckpt.latest_checkpoint(tmp_path / "fm" / "checkpoints")
    ema0 = {k[5:]: v for k, v in load_file(latest / "ema.safetensors").items() if k.startswith("ema0.")}
    model = load_file(latest / "model.safetensors")
    assert any(not torch.equal(ema0[k], model[k]) for k in ema0)  # EMA copy 0 differs from the raw weights

    # directly: prepare() copies EMA copy 0 into a differently initialised backbone
    net = builtin("backbone", "dit")(BuildContext(data=DataSpec((1, 8, 8), 10)), size="T/2", hidden=32, depth=1, heads=2)
    obj = ECT(CTX, init_from=str(tmp_path / "fm"))
    obj.prepare(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ema0[k]), k

    # through the trainer: the run starts from those weights (optimizer and EMA created after)
    calls = []
    from fewstep_plugins.ect.objective import ECT as ECTClass

    orig = ECTClass.prepare
    monkeypatch.setattr(ECTClass, "prepare", lambda self, n: (calls.append(1), orig(self, n))[1])
    ect = recipe_from_dict(tiny_dict(objective={"name": "ect", "init_from": str(tmp_path / "fm")},
                                     train={"steps": 2, "checkpoint_every": 1}))
    Trainer(ect, tmp_path / "ect", show_progress=False).run(until_step=0)
    start = ckpt.latest_checkpoint(tmp_path / "ect" / "checkpoints")
    w, e = load_file(start / "model.safetensors"), load_file(start / "ema.safetensors")
    for k in ema0:
        assert torch.equal(w[k], ema0[k]) and torch.equal(e["ema0." + k], ema0[k]), k
    Trainer(ect, tmp_path / "ect", resume=True, show_progress=False).run()
    assert calls == [1]  # not called again on resume


def test_init_from_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from"):
        ECT(CTX, init_from=str(tmp_path / "nothing")).prepare(TinyNet())
    ECT(CTX).prepare(TinyNet())  # scratch: nothing to do


def test_ict_schedule_trains_end_to_end(tmp_path):
    r = recipe_from_dict(tiny_dict(objective={"name": "ect", "schedule": "ict", "c": 0.0043, "total_steps": 800},
                                   backbone={"dropout": 0.3}, train={"steps": 3}, eval={"nfe": [1, 2]}))
    res = Trainer(r, tmp_path / "ict", show_progress=False).run()
    assert res.step == 3 and res.skipped_steps == 0
    assert res.final_metrics["ict_N"] == 11 and res.final_metrics["ect_r0_frac"] == 0.0
    assert [p.name for p in res.grids] == ["step_00000003_nfe1.png", "step_00000003_nfe2.png"]
