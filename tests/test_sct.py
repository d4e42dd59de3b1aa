"""sCT (objective `sct`, sampler `sct`): TrigFlow conversion, tangent, stabilisers, Gaussian closed form, sampler."""
import math

import pytest
import torch

from conftest import builtin
from fewstep.interfaces import Batch, BuildContext, DataSpec
from fewstep_plugins.sct.trig import consistency, scale_a, sigma_d_F, t_to_trig, trig_to_t

SD = 0.5
CTX = BuildContext(data=DataSpec((1, 4, 4), 0))


def test_conversion_states_times_and_special_points():
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a = torch.tensor([0.0, 0.1, 0.7, 1.1, 1.5], dtype=torch.float64)
    t = trig_to_t(a, SD)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * e
    x_trig = torch.cos(a)[:, None] * x0 + torch.sin(a)[:, None] * SD * e
    assert torch.allclose(scale_a(a, SD)[:, None] * x_t, x_trig, atol=1e-12)
    tt = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(trig_to_t(t_to_trig(tt, SD), SD), tt, atol=1e-14)
    assert t_to_trig(torch.tensor(1.0, dtype=torch.float64), SD).item() == pytest.approx(math.pi / 2)
    h = 1e-6
    fd = (trig_to_t(a[1:] + h, SD) - trig_to_t(a[1:] - h, SD)) / (2 * h)
    assert torch.allclose(fd, SD / scale_a(a[1:], SD) ** 2, atol=1e-8)  # dt/da = sigma_d / A^2
    assert trig_to_t(torch.tensor(math.atan(160.0), dtype=torch.float64), SD).item() == pytest.approx(80 / 81)
    assert trig_to_t(torch.tensor(1.1, dtype=torch.float64), SD).item() == pytest.approx(0.495556, abs=1e-6)


def test_proposal_is_logit_normal_in_fewstep_time():
    obj = builtin("objective", "sct")(CTX)
    assert (obj.p_mean, obj.p_std) == (-1.0, 1.4)
    torch.manual_seed(0)
    from fewstep.api import logit_normal

    t = logit_normal(1_000_000, obj.p_mean, obj.p_std, "cpu").double()
    a = t_to_trig(t, SD)
    lg = torch.log(SD * torch.tan(a))  # log(sigma_d tan a) ~ N(P_mean, P_std^2)
    assert abs(lg.mean().item() + 1.0) < 0.005 and abs(lg.std().item() - 1.4) < 0.005


class TinyNet(torch.nn.Module):
    """A smooth float64 net(x, t, s) with every input mattering."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w = torch.nn.Parameter(0.3 * torch.randn(16, 16, generator=g, dtype=torch.float64))
        self.v = torch.nn.Parameter(0.3 * torch.randn(16, generator=g, dtype=torch.float64))

    def forward(self, x, t, s, y=None):
        h = x.flatten(1)
        out = torch.tanh(h @ self.w + t[:, None] * self.v) + torch.sin(3 * t)[:, None] * h
        return out.view_as(x)


def test_parameterisation_boundary_and_identity():
    net = TinyNet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.0, 0.3, 0.9, 1.5], dtype=torch.float64)
    f = consistency(net, x, a, None, SD, {})
    assert torch.equal(f[0], x[0])  # f(x, 0) = x exactly
    t = trig_to_t(a, SD)
    x_t = x / scale_a(a, SD).view(-1, 1, 1, 1)
    assert torch.allclose(f, x_t - t.view(-1, 1, 1, 1) * net(x_t, t, t), atol=1e-12)  # = x_t - t F_fm


def test_tangent_equals_cos_times_central_difference_of_f_along_the_sample_path():
    net = TinyNet()
    obj = builtin("objective", "sct")(CTX)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    z = SD * torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.2, 0.8, 1.4], dtype=torch.float64)
    bc = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    x_trig = bc(torch.cos(a)) * x0 + bc(torch.sin(a)) * z
    dxdt = bc(torch.cos(a)) * z - bc(torch.sin(a)) * x0
    gt = obj.tangent(net, x_trig, a, dxdt, None, {}, ratio=1.0)
    h = 1e-5
    path = lambda b: bc(torch.cos(b)) * x0 + bc(torch.sin(b)) * z  # noqa: E731
    fd = (consistency(net, path(a + h), a + h, None, SD, {}) - consistency(net, path(a - h), a - h, None, SD, {})) / (2 * h)
    assert torch.allclose(gt, bc(torch.cos(a)) * fd, atol=1e-8)
    # warm-up scales only the second term: g(r) = first + r second
    g0 = obj.tangent(net, x_trig, a, dxdt, None, {}, ratio=0.0)
    g_half = obj.tangent(net, x_trig, a, dxdt, None, {}, ratio=0.5)
    assert torch.allclose(g_half, 0.5 * (g0 + gt), atol=1e-12)
    sdF = sigma_d_F(net, x_trig, a, None, SD, {})
    assert torch.allclose(g0, -bc(torch.cos(a) ** 2) * (sdF - dxdt), atol=1e-12)
    assert obj.warmup(0) == 0.0 and obj.warmup(5000) == 0.5 and obj.warmup(20_000) == 1.0


@pytest.mark.parametrize("s", [0.5, 0.9])
def test_gaussian_exact_consistency_function_gives_zero_tangent(s):
    """Data N(0, s^2): V(a) = cos^2 s^2 + sin^2 sigma_d^2, f*(x, a) = x s / sqrt(V). Along the exact marginal
    velocity dx/da = x V'/(2V) (the PF-ODE; sCT's sample velocity is an unbiased estimate of it), g == 0."""
    class Exact(torch.nn.Module):  # F_fm of the exact consistency function in fewstep time: (x_t - f*) / t
        def forward(self, x, t, s_, y=None):
            Vf = ((1 - t) ** 2 * s ** 2 + t ** 2).view(-1, 1, 1, 1)
            return (x - x * s / torch.sqrt(Vf)) / t.view(-1, 1, 1, 1)

    obj = builtin("objective", "sct")(CTX)
    g = torch.Generator().manual_seed(3)
    a = torch.tensor([0.1, 0.6, 1.2, 1.5], dtype=torch.float64)
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    V = (torch.cos(a) ** 2 * s ** 2 + torch.sin(a) ** 2 * SD ** 2).view(-1, 1, 1, 1)
    dV = (2 * torch.cos(a) * torch.sin(a) * (SD ** 2 - s ** 2)).view(-1, 1, 1, 1)
    f = consistency(Exact(), x, a, None, SD, {})
    assert torch.allclose(f, x * s / torch.sqrt(V), atol=1e-12)
    gt = obj.tangent(Exact(), x, a, x * dV / (2 * V), None, {}, ratio=1.0)
    assert gt.abs().max() < 1e-10


def test_gradient_is_minus_two_e_w_over_d_g_dot_dF_and_normalisations():
    torch.manual_seed(0)
    net = TinyNet()
    obj = builtin("objective", "sct")(CTX, warmup_steps=0)
    obj.extend(net)
    net.double()
    with torch.no_grad():
        net.sct_weighting.linear.bias.fill_(0.3)
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    e = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    out = obj.loss_core(net, x0, e, t, None, step=0)
    params = [net.w, net.v]
    grads = torch.autograd.grad(out.loss, params)
    a = t_to_trig(t, SD)
    bc = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    z = SD * e
    x_trig, dxdt = bc(torch.cos(a)) * x0 + bc(torch.sin(a)) * z, bc(torch.cos(a)) * z - bc(torch.sin(a)) * x0
    gt = obj.tangent(net, x_trig, a, dxdt, None, {}, ratio=1.0)
    n = gt.flatten(1).norm(dim=1)
    gn = gt / bc(n + 0.1)
    assert torch.allclose(gn.flatten(1).norm(dim=1), n / (n + 0.1))
    F = sigma_d_F(net, x_trig, a, None, SD, {}) / SD
    D = 16
    w = net.sct_weighting(a).double()
    surrogate = (-2 * torch.exp(w) / D * (gn * F).flatten(1).sum(1)).mean()  # d/dtheta of e^w/D ||F - sg F - g||^2
    ref = torch.autograd.grad(surrogate, params)
    for p, q in zip(grads, ref):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-14)
    from fewstep_plugins.sct.objective import normalise

    rms = normalise(gt, 0.1, "rms")
    r = gt.flatten(1).norm(dim=1) / 4.0
    assert torch.allclose(rms.flatten(1).norm(dim=1) / 4.0, r / (r + 0.1))


def test_adaptive_weight_converges_to_log_d_over_ell():
    """Minimising e^w / D ell - w over w gives w* = log(D / ell)."""
    from fewstep_plugins.sct.objective import AdaptiveWeight

    head = AdaptiveWeight(8)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    a = torch.full((4,), 0.7)
    ell, D = 3.0, 16
    for _ in range(3000):
        opt.zero_grad()
        w = head(a)
        (torch.exp(w) / D * ell - w).mean().backward()
        opt.step()
    assert abs(head(a)[0].item() - math.log(D / ell)) < 1e-3


def test_adaptive_weight_is_float32_under_bf16_autocast():
    """Near its optimum w ~ log(D) ~ 8, bf16 spacing is 0.0625 (e^w in 6.4% steps): the head must not round."""
    from fewstep_plugins.sct.objective import AdaptiveWeight

    torch.manual_seed(0)
    head = AdaptiveWeight(16)
    with torch.no_grad():
        head.linear.weight.copy_(0.002 * torch.randn_like(head.linear.weight))
        head.linear.bias.fill_(8.0)
    a = torch.linspace(0.1, 1.5, 7)
    plain = head(a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = head(a)
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)
    # the float64 closed form of the same head
    half = 8
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    arg = a.double()[:, None] * freqs[None]
    ref = torch.cat([arg.cos(), arg.sin()], -1) @ head.linear.weight.double()[0] + 8.0
    assert torch.allclose(auto.double(), ref, atol=1e-5)
    assert (ref.max() - ref.min()) < 0.0625 and len(set(auto.tolist())) == 7  # time dependence below bf16 spacing kept


def test_loss_trains_the_weighting_head_and_shares_dropout_masks():
    from conftest import make_dit

    torch.manual_seed(0)
    net = make_dit(1, 4, 0, size="T/2", hidden=16, depth=1, heads=2, dropout=0.3)
    obj = builtin("objective", "sct")(CTX)
    obj.extend(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = obj.loss(net, Batch(torch.randn(6, 1, 4, 4), None), 100)
    out.loss.backward()
    assert torch.isfinite(out.loss) and net.sct_weighting.linear.weight.grad.abs().sum() > 0
    assert out.metrics["sct_warmup"] == pytest.approx(0.01)
    # with mask sharing, the gradient forward's F equals the JVP's primal, so ||F - sg(F) - g||^2 == ||g||^2:
    # sct_err is the mean of ||g_normalised||^2 / D
    assert out.metrics["sct_err"].item() < 1.0 / 16 + 1e-6


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, s, y=None):
        self.calls.append((t.clone(), x.clone()))
        return torch.zeros_like(x)  # f = x_t: x0_hat is the input itself


def test_sampler_call_sequence():
    obj = builtin("objective", "sct")(CTX)
    smp = builtin("sampler", "sct")(CTX)
    noise = torch.randn(2, 1, 4, 4)
    net = Recorder()
    out = smp.sample(obj, net, noise, None, 1)
    assert len(net.calls) == 1 and torch.allclose(net.calls[0][0], torch.full((2,), 80 / 81))
    assert torch.allclose(out, 80 / 81 * noise)
    net = Recorder()
    gen = torch.Generator().manual_seed(5)
    out = smp.sample(obj, net, noise, None, 2, generator=gen)
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    tm = trig_to_t(torch.tensor(1.1, dtype=torch.float64), SD).item()
    assert len(net.calls) == 2 and torch.allclose(net.calls[1][0], torch.full((2,), tm))
    assert torch.allclose(net.calls[1][1], (1 - tm) * (80 / 81 * noise) + tm * fresh, atol=1e-6)
    again = smp.sample(obj, Recorder(), noise, None, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


def test_trains_and_resumes_with_the_weighting_head(tiny, tmp_path):
    from fewstep.api import Trainer

    r = tiny(objective={"name": "sct"}, train={"steps": 3, "checkpoint_every": 2})
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert res.step == 3 and math.isfinite(res.final_metrics["sct_err"])
    from safetensors.torch import load_file

    ckpts = sorted((tmp_path / "run").rglob("model.safetensors"))
    assert ckpts and any(k.startswith("sct_weighting.") for k in load_file(str(ckpts[-1])))
