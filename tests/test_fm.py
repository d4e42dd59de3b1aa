"""Flow matching: the path, the loss against its closed form, the ODE sampler against exact solutions."""
import math

import torch

from fewstep.interfaces import Batch, BuildContext, DataSpec
from fewstep.path import interpolate, velocity
from conftest import builtin

FlowMatching = builtin("objective", "fm")
ODESampler = builtin("sampler", "ode")

CTX = BuildContext(data=DataSpec((2, 4, 4), 3))


class Recorder(torch.nn.Module):
    """net(x, t, s, y) = a * x, recording its inputs."""

    def __init__(self, a=0.7):
        super().__init__()
        self.a = a
        self.calls = []

    def forward(self, x, t, s, y):
        self.calls.append((x.clone(), t.clone(), s.clone(), None if y is None else y.clone()))
        return self.a * x


def test_path_end_points_and_velocity():
    x0, e = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    path = lambda t: interpolate(x0, e, torch.full((3,), t, dtype=torch.float64))
    assert torch.equal(path(0.0), x0) and torch.equal(path(1.0), e)
    h = 1e-4
    fd = (path(0.4 + h) - path(0.4 - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity(x0, e), atol=1e-8, rtol=1e-8)


def test_fm_loss_equals_closed_form_on_fixed_batch():
    obj = FlowMatching(CTX, label_drop=0.0)
    net = Recorder()
    x0 = torch.randn(6, 2, 4, 4)
    torch.manual_seed(5)
    out = obj.loss(net, Batch(x0, torch.arange(6) % 3), step=0)
    (x_t, t, s, y), = net.calls
    assert torch.equal(t, s)  # the velocity is the network at s = t
    # recover e from the path and rebuild the loss by hand
    tb = t.view(-1, 1, 1, 1)
    e = (x_t - (1 - tb) * x0) / tb
    torch.manual_seed(5)
    t_ref = torch.sigmoid(torch.randn(6))
    e_ref = torch.randn_like(x0)
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(e, e_ref, atol=1e-5, rtol=1e-4)
    expected = ((0.7 * x_t - (e_ref - x0)) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(y, torch.arange(6) % 3)


def test_label_drop_uses_the_null_class():
    obj = FlowMatching(CTX, label_drop=1.0)
    net = Recorder()
    obj.loss(net, Batch(torch.randn(4, 2, 4, 4), torch.zeros(4, dtype=torch.long)), 0)
    assert torch.equal(net.calls[0][3], torch.full((4,), 3))


def test_euler_sampler_on_linear_ode_matches_closed_form():
    """v(x, t) = x: Euler from t = 1 to 0 with n steps gives x1 (1 - 1/n)^n exactly."""
    obj = FlowMatching(CTX)
    net = Recorder(a=1.0)
    x1 = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for n in (1, 3, 8):
        net.calls.clear()
        out = ODESampler(CTX, method="euler").sample(obj, net, x1, None, nfe=n)
        torch.testing.assert_close(out, x1 * (1 - 1 / n) ** n)
        assert len(net.calls) == n
        assert [round(c[1][0].item(), 6) for c in net.calls] == [round(1 - i / n, 6) for i in range(n)]


def test_heun_converges_to_exact_solution():
    """dx/dt = x integrated from 1 to 0 is x1 * e^-1; Heun's error falls as O(h^2)."""
    obj = FlowMatching(CTX)
    net = Recorder(a=1.0)
    x1 = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    errs = []
    for nfe in (9, 17, 33):
        out = ODESampler(CTX, method="heun").sample(obj, net, x1, None, nfe=nfe)
        errs.append((out - math.exp(-1)).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3


def test_cfg_combines_conditional_and_null_velocities():
    class ClassNet(torch.nn.Module):
        def forward(self, x, t, s, y):
            return x * 0 + (y.float() + 1).view(-1, 1, 1, 1)  # v_c = y + 1, v_u = null + 1 = 4

    obj = FlowMatching(CTX)
    smp = ODESampler(CTX, method="euler", cfg_scale=3.0)
    x = torch.zeros(2, 2, 4, 4)
    v = smp.velocity(obj, ClassNet(), x, torch.ones(2), torch.tensor([0, 1]))
    # v_u + w (v_c - v_u): 4 + 3 (1 - 4) = -5 ; 4 + 3 (2 - 4) = -2
    assert torch.equal(v[:, 0, 0, 0], torch.tensor([-5.0, -2.0]))
