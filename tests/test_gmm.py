"""Gaussian-mixture ground truth: exact velocity, exact flow map, distances, and SoFlow at the optimum."""
import math

import pytest
import torch

from fewstep.interfaces import BuildContext, DataSpec
from fewstep_plugins.gmm.data import mixture_from_options
from fewstep_plugins.gmm.exact import GaussianMixture, energy_distance, gaussian_flow_map, sliced_w2
from conftest import builtin

SoFlow = builtin("objective", "soflow")
GMMSource = builtin("dataset", "gmm")
GMMExact = builtin("evaluator", "gmm-exact")


def ring(std=0.15, K=4, d=2):
    return mixture_from_options(K, d, "ring", 2.0, std, [], [], [], 0)


def test_velocity_matches_monte_carlo_posterior_mean():
    """v*(x, t) = E[e - x0 | x_t = x], estimated by importance weights over 400k data draws."""
    mix = mixture_from_options(3, 2, "ring", 1.5, 0.3, [], [], [1.0, 2.0, 3.0], 0)
    g = torch.Generator().manual_seed(0)
    x0, _ = mix.sample(400_000, g)
    for t in (0.3, 0.6, 0.9):
        x = torch.tensor([[0.4, -0.2], [1.2, 0.5]], dtype=torch.float64)
        exact = mix.velocity(x, torch.full((2,), t, dtype=torch.float64))
        for i in range(2):
            logw = -((x[i] - (1 - t) * x0) ** 2).sum(1) / (2 * t * t)
            w = torch.softmax(logw, 0)
            e = (x[i] - (1 - t) * x0) / t
            mc = (w[:, None] * (e - x0)).sum(0)
            torch.testing.assert_close(exact[i], mc, atol=0.03, rtol=0)


def test_velocity_is_stable_at_the_end_points():
    mix = ring(std=0.05, K=8)
    x = torch.randn(64, 2, dtype=torch.float64) * 3
    for t in (0.0, 1e-9, 1.0 - 1e-12, 1.0):
        v = mix.velocity(x, torch.full((64,), t, dtype=torch.float64))
        assert torch.isfinite(v).all()
    # at t = 1 the posterior is the prior and v = x - E[x0]
    v1 = mix.velocity(x, torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(v1, x - mix.means.mean(0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("t,s", [(1.0, 0.0), (0.9, 0.3), (0.5, 0.49), (0.25, 0.0)])
def test_integrated_flow_map_matches_single_gaussian_closed_form(t, s):
    mu, s0 = 0.7, 0.3
    mix = GaussianMixture(torch.ones(1), torch.full((1, 3), mu), torch.full((1, 3), s0))
    x = torch.randn(100, 3, dtype=torch.float64)
    tt, ss = torch.full((100,), t, dtype=torch.float64), torch.full((100,), s, dtype=torch.float64)
    got = mix.flow_map(x, tt, ss, steps=256)
    torch.testing.assert_close(got, gaussian_flow_map(x, t, s, mu, s0), atol=1e-6, rtol=0)


def test_euler_sampling_of_the_exact_velocity_reproduces_the_mixture():
    """1000 Euler steps from noise: the distances to true samples are at the level of two true sample sets."""
    mix = ring(std=0.15, K=8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    e = x.clone()
    n = 1000
    for i in range(n):
        t = torch.full((2000,), 1 - i / n, dtype=torch.float64)
        x = x - (1 / n) * mix.velocity(x, t)
    ref, _ = mix.sample(2000, torch.Generator().manual_seed(2))
    other, _ = mix.sample(2000, torch.Generator().manual_seed(3))
    floor_w2 = sliced_w2(other, ref)  # two true sample sets of 2000: about 0.08
    assert sliced_w2(x, ref) < 0.15 and energy_distance(x, ref) < 0.005  # stated bounds
    assert sliced_w2(x, ref) < 2 * floor_w2
    # Euler with 1000 steps lands where the RK4 flow map does (mean distance about 6e-4)
    one = torch.ones(500, dtype=torch.float64)
    assert (mix.flow_map(e[:500], one, 0 * one, steps=128) - x[:500]).norm(dim=1).mean() < 2e-3
    noise = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    assert sliced_w2(noise, ref) > 5 * sliced_w2(x, ref)  # the distances can tell


def test_distances_are_zero_for_identical_sets_and_grow_with_a_shift():
    a = torch.randn(1000, 2, dtype=torch.float64)
    assert sliced_w2(a, a) == 0.0 and abs(energy_distance(a, a)) < 1e-12
    assert energy_distance(a + 0.5, a) > energy_distance(a + 0.1, a) > 0
    d = [sliced_w2(a + s, a) for s in (0.1, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]
    assert abs(sliced_w2(a + torch.tensor([1.0, 0.0], dtype=torch.float64), a) - 1 / math.sqrt(2)) < 0.1


class ExactF(torch.nn.Module):
    """SoFlow's F from the exact solution: F = (f*(x, t, s) - x) / (s - t); F(x, t, t) = v*(x, t)."""

    def __init__(self, mix):
        super().__init__()
        self.mix = mix

    def forward(self, x, t, s, y=None):
        x, t, s = x.double(), t.double(), s.double()
        out = self.mix.velocity(x, t)
        diff = (s - t).abs() > 1e-12
        if diff.any():
            f = self.mix.flow_map(x[diff], t[diff], s[diff], steps=128)
            out[diff] = (f - x[diff]) / (s[diff] - t[diff])[:, None]
        return out


def test_exact_solution_is_soflows_optimum():
    """Plug f* into SoFlow: the 1-NFE map is exact, the teacher step along v* makes the residual vanish,
    and along the sampled (conditional) velocity the residual has mean ~0 (the loss's gradient at f*)."""
    mix = ring(std=0.2, K=4)
    obj = SoFlow(BuildContext(data=DataSpec((2,), 0)), fm_ratio=0.0, cfg_scale=1.0, cfg_drop=0.0, mix_ratio=1.0)
    net = ExactF(mix)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(200, 2, generator=g, dtype=torch.float64)
    one = torch.ones(200, dtype=torch.float64)
    torch.testing.assert_close(obj.flow_map(net, e, one, 0 * one, None), mix.flow_map(e, one, 0 * one), atol=1e-5, rtol=0)

    n = 2000
    x0, _ = mix.sample(n, g)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.full((n,), 0.6, dtype=torch.float64)
    s = torch.full((n,), 0.2, dtype=torch.float64)
    l = t - 1e-3
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    f_t = obj.flow_map(net, x_t, t, s, None)
    # teacher stepping along the exact velocity: the finite difference is O(t - l) small
    x_l = x_t + (l - t)[:, None] * mix.velocity(x_t, t)
    q_exact = (f_t - obj.flow_map(net, x_l, l, s, None)) / (t - l)[:, None]
    assert q_exact.abs().max() < 5e-3
    # along the conditional velocity e - x0 (what training sees) it averages out
    x_l = x_t + (l - t)[:, None] * (eps - x0)
    q = (f_t - obj.flow_map(net, x_l, l, s, None)) / (t - l)[:, None]
    assert q.mean(0).abs().max() < 4 * q.std(0).max() / math.sqrt(n)
    assert q.std(0).min() > 0.1  # it is noise, not zero, row by row


def test_gmm_source_and_evaluator_on_a_model_that_is_the_exact_map(tmp_path):
    data = GMMSource(BuildContext(), components=4, dim=2, std=0.2, num_samples=2000)
    assert data.spec.shape == (2,) and data.spec.num_classes == 0

    class ExactObjective:
        def flow_map(self, net, x, t, s, y):
            return data.mixture.flow_map(x.double(), t.double(), s.double(), 64).float()

    ev = GMMExact(BuildContext(), times=[1.0, 0.5], num_points=200, ode_steps=64)
    ref = data.x
    gen, _ = data.mixture.sample(2000, torch.Generator().manual_seed(5))
    res = ev.evaluate(gen.float(), ref, objective=ExactObjective(), net=None, data=data)
    assert res["fmap_err_1_0"] < 1e-6 and res["fmap_err_mean"] < 1e-6
    assert {"fmap_err_t1_s0", "fmap_err_t1_s0.5", "fmap_err_t0.5_s0"} <= set(res)
    assert res["mode_tv"] < 0.05 and res["sliced_w2"] < 0.15  # two true sample sets of 2000
    collapsed = data.mixture.means[0].expand(2000, 2).float() + 0.01 * torch.randn(2000, 2)
    bad = ev.evaluate(collapsed, ref, data=data)
    assert bad["mode_tv"] > 0.7 and bad["sliced_w2"] > 5 * res["sliced_w2"]
    heat = ev.plot({"exact": res, "zero": {k: 1.0 for k in res if k.startswith("fmap_err_t")}}, tmp_path / "h.png")
    assert heat.stat().st_size > 1000
    assert ev.plot({"no-model": bad}, tmp_path / "none.png") is None  # nothing to draw without flow-map errors
