"""MeanFlow (docs/objectives/meanflow.md): time sampling, the JVP target, CFG, weighting, sampler, DDP gradients."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch.nn.functional as F

from fewstep.engine.distributed import DistInfo, all_reduce_grads, broadcast_params
from fewstep.interfaces import BuildContext, DataSpec
from fewstep.path import interpolate
from fewstep_plugins.meanflow.jvp import math_attention, u_and_dudt
from conftest import builtin

MeanFlow = builtin("objective", "meanflow")
MeanFlowSampler = builtin("sampler", "meanflow")

CTX = BuildContext(data=DataSpec((2, 4, 4), 3))  # 3 classes, null class 3
UNCOND = BuildContext(data=DataSpec((2, 4, 4), 0))


def small_dit(dtype=torch.float64, seed=0, **kw):
    """hidden 32, depth 2, 4 tokens; adaLN and the final layer randomised so u is not zero."""
    from conftest import make_dit as DiT  # imported here: the gloo workers re-import this module, timm is slow

    torch.manual_seed(seed)
    args = dict(in_channels=2, image_size=4, num_classes=3, size="T/2", hidden=32, depth=2, heads=2, attention="math")
    args.update(kw)
    net = DiT(**args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.to(dtype)


def fixed_batch(b=8, dtype=torch.float64, seed=1, shape=(2, 4, 4)):
    """x0, e, t >= r with the first half r = t, labels, and a drop mask on row 0."""
    g = torch.Generator().manual_seed(seed)
    x0, e = torch.randn(b, *shape, generator=g, dtype=dtype), torch.randn(b, *shape, generator=g, dtype=dtype)
    a, c = torch.rand(b, generator=g, dtype=dtype), torch.rand(b, generator=g, dtype=dtype)
    t, r = torch.maximum(a, c), torch.minimum(a, c)
    r[: b // 2] = t[: b // 2]
    y = torch.randint(0, 3, (b,), generator=g)
    drop = torch.arange(b) < 1
    return x0, e, t, r, y, drop


def grads(net):
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}


# -- registration and options ------------------------------------------------------------------
def test_registered_with_official_defaults_and_no_torch_at_import():
    from fewstep.registry import get_registry

    reg = get_registry()
    obj = reg.get("objective", "meanflow")
    assert obj.extras["default_sampler"] == "meanflow"
    assert reg.get("sampler", "meanflow")
    d = obj.options.resolve({})
    assert (d["t_mean"], d["t_std"], d["r_mean"], d["r_std"], d["fm_share"], d["fm_rows"]) == (-0.4, 1.0, -0.4, 1.0, 0.75, "first")
    assert (d["p"], d["eps"], d["omega"], d["kappa"], d["cfg_t_min"], d["cfg_t_max"]) == (1.0, 0.01, 1.0, 0.5, 0.0, 1.0)
    assert (d["class_drop"], d["drop_rows"], d["jvp_mode"]) == (0.1, "first", "lean")
    assert all(o.help for o in obj.options.options)
    code = "import sys, fewstep_plugins.meanflow; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_options_are_validated():
    from fewstep.recipe import RecipeError, recipe_from_dict

    base = {"data": {"name": "digits"}, "backbone": {"name": "dit"}, "train": {}, "eval": {}}
    with pytest.raises(RecipeError, match="jvp_mode"):
        recipe_from_dict({**base, "objective": {"name": "meanflow", "jvp_mode": "double"}})
    with pytest.raises(RecipeError, match="kappa"):
        recipe_from_dict({**base, "objective": {"name": "meanflow", "kappa": 1.0}})
    with pytest.raises(ValueError, match="cfg_t_min"):
        MeanFlow(CTX, cfg_t_min=0.8, cfg_t_max=0.5)
    assert MeanFlow(CTX, jvp_mode="single").manual_grad_sync and not MeanFlow(CTX).manual_grad_sync


# -- (t, r) sampling and class dropout (meanflow.py:147-157, 191-200) -----------------------------------------
def test_official_tr_sampler_first_rows_are_fm_rows():
    obj = MeanFlow(CTX)
    t, r = obj.sample_tr(200_000, "cpu")
    n_fm = int(0.75 * 200_000)
    assert torch.equal(t[:n_fm], r[:n_fm]) and bool((r[n_fm:] < t[n_fm:]).all())
    gap = (t - r)[n_fm:]
    assert abs(gap.median().item() - 0.20) < 0.01  # median off-diagonal gap about 0.20 with P_mean -0.4, P_std 1
    # both logit-normal(-0.4, 1) then sorted: t = max of two draws -> P(logit t < -0.4) = 1/4
    assert abs((torch.logit(t[n_fm:]) < -0.4).float().mean().item() - 0.25) < 0.01


def test_random_rows_and_cifar_v1_sampler():
    obj = MeanFlow(CTX, time_sampler="min", t_mean=-0.6, t_std=1.6, r_mean=-4.0, r_std=1.6, fm_share=0.25,
                   fm_rows="random")
    t, r = obj.sample_tr(200_000, "cpu")
    assert bool((r <= t).all())
    p_swap = 0.5 * math.erfc(3.4 / (1.6 * math.sqrt(2)) / math.sqrt(2))  # P(r draw > t draw)
    assert abs((r == t).float().mean().item() - (0.25 + 0.75 * p_swap)) < 0.01  # mask, then r = min(t, r)
    assert abs(torch.logit(t).mean().item() + 0.6) < 0.02 and abs(torch.logit(t).std().item() - 1.6) < 0.02  # t unsorted


def test_class_drop_first_rows_by_index():
    obj = MeanFlow(CTX)
    masks = torch.stack([obj.drop_mask(64, "cpu") for _ in range(2000)])
    counts = masks.sum(1)
    for m, n in zip(masks, counts):
        assert torch.equal(m, torch.arange(64) < n)
    assert abs(counts.float().mean().item() - 6.4) < 0.1
    rnd = torch.stack([MeanFlow(CTX, drop_rows="random").drop_mask(64, "cpu") for _ in range(200)])
    assert rnd[:, 32:].any()  # a random mask reaches the later rows


# -- the JVP (meanflow.py:224-231) -------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["backbone", "torch"])
@pytest.mark.parametrize("mode", ["single", "lean"])
def test_jvp_matches_central_difference(mode, impl):
    net = small_dit()
    x0, e, t, r, y, _ = fixed_batch()
    z = interpolate(x0, e, t)
    v_g = torch.randn_like(z)
    u, dudt = u_and_dudt(net, z, t, r, y, v_g, mode, impl=impl)
    with torch.no_grad():
        torch.testing.assert_close(u, net(z, t, r, y), rtol=1e-12, atol=1e-12)
        h = 1e-5
        fd = (net(z + h * v_g, t + h, r, y) - net(z - h * v_g, t - h, r, y)) / (2 * h)
    off = t != r  # lean computes du/dt on these rows only (h = 0 rows multiply it by clip(t - r) = 0)
    rel = (dudt[off] - fd[off]).norm() / fd[off].norm()
    assert rel < 1e-4, rel
    assert fd[off].norm() > 1e-2  # a non-trivial derivative
    if mode == "lean":
        assert torch.count_nonzero(dudt[~off]) == 0
    else:
        assert (dudt[~off] - fd[~off]).norm() / fd[~off].norm() < 1e-4


@pytest.mark.parametrize("impl", ["backbone", "torch"])
@pytest.mark.parametrize("mode", ["single", "lean"])
def test_fused_attention_dit_works_inside_the_jvp(mode, impl):
    fused = small_dit(torch.float32, attention="fused")
    math_net = small_dit(torch.float32, attention="math")
    x0, e, t, r, y, _ = fixed_batch(dtype=torch.float32)
    z = interpolate(x0, e, t)
    v_g = torch.randn_like(z)
    u, dudt = u_and_dudt(fused, z, t, r, y, v_g, mode, impl=impl)  # no "forward AD ... not implemented" error
    u_ref, dudt_ref = u_and_dudt(math_net, z, t, r, y, v_g, mode, impl="torch")
    torch.testing.assert_close(u, u_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dudt, dudt_ref, rtol=1e-4, atol=1e-4)
    assert all(blk.attn.fused_attn for blk in fused.blocks)  # ordinary forwards keep the fused kernel
    with math_attention(fused):
        torch.func.jvp(lambda z_: fused(z_, t, r, y), (z,), (v_g,))


# -- the target and the loss (meanflow.py:235-246) ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["single", "lean"])
def test_r_equals_t_rows_reduce_to_flow_matching(mode):
    """At r = t, u_tgt = v_g = v (no CFG): the loss and its gradient are a weighted FM loss."""
    obj = MeanFlow(CTX, omega=1.0, kappa=0.0, jvp_mode=mode)
    net = small_dit()
    x0, e, t, _, y, _ = fixed_batch()
    out = obj.loss_core(net, x0, e, t, t, y, None)
    out.loss.backward()
    g_mf = grads(net)
    net.zero_grad()
    err = ((net(interpolate(x0, e, t), t, t, y) - (e - x0)) ** 2).flatten(1).sum(1)
    fm = (err / (err.detach() + 0.01)).mean()
    fm.backward()
    torch.testing.assert_close(out.loss, fm, rtol=1e-12, atol=1e-12)
    for k, g in grads(net).items():
        torch.testing.assert_close(g_mf[k], g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["sq_err_sum"], err.mean().detach())
    torch.testing.assert_close(out.metrics["mse"], err.mean().detach() / 32)


class GaussianAverageVelocity(torch.nn.Module):
    """The exact u(z, t, r) for data N(mu, s0^2) per element, from the closed-form flow map
    x_r = (1 - r) mu + k(r) / k(t) (x_t - (1 - t) mu), k(s)^2 = (1 - s)^2 s0^2 + s^2:
    u = (x_t - x_r) / (t - r) = -mu + [(s0^2 + 1)(t + r) - 2 s0^2] / ((k(t) + k(r)) k(t)) (x_t - (1 - t) mu)
    (the divided difference of k written without the 0/0 at r = t, where it gives the velocity)."""

    def __init__(self, mu, s0):
        super().__init__()
        self.mu, self.s0 = mu, s0

    def k(self, s):
        return ((1 - s) ** 2 * self.s0 ** 2 + s ** 2).sqrt()

    def forward(self, x, t, s, y):
        t, r = t.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        slope = ((self.s0 ** 2 + 1) * (t + r) - 2 * self.s0 ** 2) / ((self.k(t) + self.k(r)) * self.k(t))
        return -self.mu + slope * (x - (1 - t) * self.mu)


@pytest.mark.parametrize("mode", ["single", "lean"])
def test_gaussian_toy_exact_average_velocity_has_zero_error(mode):
    """Plugging the exact u in, the MeanFlow target equals u on every row when v is the marginal velocity
    E[e - x0 | z_t] (the regression target of the conditional v): error ~ 0, while du/dt is far from 0."""
    mu, s0 = 0.7, 0.5
    net = GaussianAverageVelocity(mu, s0)
    obj = MeanFlow(UNCOND, jvp_mode=mode)
    g = torch.Generator().manual_seed(0)
    b = 64
    x0 = mu + s0 * torch.randn(b, 2, 2, 2, generator=g, dtype=torch.float64)
    e = torch.randn(b, 2, 2, 2, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.98 + 0.01
    r = t * torch.rand(b, generator=g, dtype=torch.float64)
    r[:16] = t[:16]
    z = interpolate(x0, e, t)
    tb = t.view(-1, 1, 1, 1)
    k2 = (1 - tb) ** 2 * s0 ** 2 + tb ** 2
    x0_hat = mu + (1 - tb) * s0 ** 2 / k2 * (z - (1 - tb) * mu)  # posterior means: same z_t, marginal velocity
    e_hat = tb / k2 * (z - (1 - tb) * mu)
    torch.testing.assert_close(interpolate(x0_hat, e_hat, t), z)
    out = obj.loss_core(net, x0_hat, e_hat, t, r, None, None)
    assert out.metrics["sq_err_sum"] < 1e-20
    _, dudt = u_and_dudt(net, z, t, r, None, e_hat - x0_hat, mode)
    assert ((tb - r.view(-1, 1, 1, 1)) * dudt)[16:].abs().mean() > 0.05  # the JVP term matters here
    # with the per-sample conditional v the error is not zero (only its conditional mean is)
    assert obj.loss_core(net, x0, e, t, r, None, None).metrics["sq_err_sum"] > 0.1


def test_adaptive_weight_is_detached():
    obj = MeanFlow(CTX, p=0.75, eps=0.01)
    u_tgt = torch.randn(5, 2, 4, 4, dtype=torch.float64) * torch.arange(1, 6, dtype=torch.float64).view(-1, 1, 1, 1)
    u = torch.randn_like(u_tgt).requires_grad_(True)
    out = obj.weighted_loss(u, u_tgt)
    out.loss.backward()
    delta = (u - u_tgt).detach()
    err = (delta ** 2).flatten(1).sum(1)
    w = (err + 0.01) ** -0.75
    torch.testing.assert_close(out.loss, (w * err).mean())
    torch.testing.assert_close(u.grad, 2 * w.view(-1, 1, 1, 1) * delta / 5, rtol=1e-12, atol=1e-14)
    # p = 1: per-row weighted losses ~ 1 whatever the error; the logged raw error follows the error
    per_row = err / (err + 0.01)
    assert bool((per_row > 0.99).all()) and out.metrics["sq_err_sum"] == pytest.approx(err.mean().item())


# -- training-time CFG (meanflow.py:171-200) ----------------------------------------------------------
class ConstantFields(torch.nn.Module):
    """net(x, t, s, y) = value[y] everywhere; records (training, t, s) per call."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.calls = []

    def forward(self, x, t, s, y):
        self.calls.append((self.training, t.clone(), s.clone()))
        return self.values[y].view(-1, 1, 1, 1).expand_as(x).to(x.dtype)


def test_cfg_target_rows_and_eval_mode():
    obj = MeanFlow(CTX, omega=0.2, kappa=0.92, cfg_t_min=0.0, cfg_t_max=0.75)
    net = ConstantFields(torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=torch.float64))  # null (3) -> -1
    t = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2])
    drop = torch.tensor([False, False, False, True])
    v = torch.full((4, 2, 4, 4), 5.0, dtype=torch.float64)
    v_g = obj.guided_velocity(net, v, v, t, y, drop)
    expect = [0.2 * 5 + (1 - 0.2 - 0.92) * -1 + 0.92 * c for c in (1.0, 2.0)] + [5.0, 5.0]  # t > 0.75, dropped
    torch.testing.assert_close(v_g[:, 0, 0, 0], torch.tensor(expect, dtype=torch.float64))
    (training, tt, ss), = net.calls  # one batched call, at s = t, for the 2 guided rows only
    assert not training and net.training and torch.equal(tt, ss) and tt.numel() == 4


@pytest.mark.parametrize("omega,kappa", [(1.0, 0.5), (0.2, 0.92), (3.0, 0.0)])
def test_cfg_perfect_learner_fixed_point(omega, kappa):
    """Regressing u(., t, t, y) onto v_g repeatedly converges to v_u + omega / (1 - kappa) (v_c - v_u)."""
    obj = MeanFlow(CTX, omega=omega, kappa=kappa)
    v_true, v_u = 2.0, -0.5  # the class's data velocity and the (converged) null-class velocity
    vals = torch.tensor([0.0, 0.0, 0.0, v_u], dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    t = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    v = torch.full((8, 1, 1, 1), v_true, dtype=torch.float64)
    for _ in range(500):
        v_g = obj.guided_velocity(ConstantFields(vals), v, v, t, y)
        vals[0] = v_g.mean()  # a perfect learner matches the target's mean
    torch.testing.assert_close(vals[0].item(), v_u + omega / (1 - kappa) * (v_true - v_u), rtol=1e-9, atol=1e-9)


def test_cfg_off_when_unconditional_and_target_has_no_grad():
    net = small_dit()
    x0, e, t, r, y, drop = fixed_batch()
    z, v = interpolate(x0, e, t), e - x0
    assert MeanFlow(UNCOND).guided_velocity(net, z, v, t, None) is v
    assert not MeanFlow(CTX).guided_velocity(net, z, v, t, y, drop).requires_grad


# -- single vs lean (docs/objectives/meanflow.md) ------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_single_and_lean_give_the_same_gradient(dropout):
    """Every execution path gives one loss and one gradient: JVP mode x JVP implementation x CFG reuse
    (with dropout the backbone JVP and the reuse step aside: 'auto' falls back to torch.func.jvp)."""
    x0, e, t, r, y, drop = fixed_batch(b=10)
    out = {}
    for mode in ("single", "lean"):
        for impl in ("torch", "auto"):
            for reuse in (False, True):
                net = small_dit(dropout=dropout)
                torch.manual_seed(7)  # the same dropout masks in every run
                res = MeanFlow(CTX, jvp_mode=mode, jvp_impl=impl, reuse_u_for_cfg=reuse).loss_core(net, x0, e, t, r, y, drop)
                res.loss.backward()
                out[mode, impl, reuse] = (res.loss.detach(), grads(net))
    ref_loss, ref_grads = out["single", "torch", False]
    assert ref_loss > 0
    for key, (loss, g) in out.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12, msg=str(key))
        for k in ref_grads:
            torch.testing.assert_close(g[k], ref_grads[k], rtol=1e-9, atol=1e-12, msg=f"{key} {k}")


class CountingDiT(torch.nn.Module):
    """A DiT that records the rows and the label of every plain forward (not forward_jvp)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, s, y):
        self.calls.append((self.training, y.clone()))
        return self.net(x, t, s, y)

    def forward_jvp(self, *args):
        return self.net.forward_jvp(*args)


def test_cfg_reuse_skips_v_c_on_r_equals_t_rows():
    """With reuse, the guidance forward computes v_c only on the guided r != t rows (v_u on all guided rows);
    without it, v_c on every guided row: 2 x 9 rows against 9 + 5 (b = 10, row 0 dropped, rows 5-9 have r != t)."""
    x0, e, t, r, y, drop = fixed_batch(b=10)
    for reuse, rows in ((False, 18), (True, 14)):
        net = CountingDiT(small_dit())
        MeanFlow(CTX, reuse_u_for_cfg=reuse).loss_core(net, x0, e, t, r, y, drop)
        (train0, y0), (train1, y1) = net.calls  # the guidance forward (eval), then the u forward (train)
        assert not train0 and train1
        assert y0.numel() == rows and int((y0 == 3).sum()) == 9  # 9 null-label (v_u) rows either way
        assert y1.numel() == 10


def test_backbone_jvp_needs_a_deterministic_backbone_with_forward_jvp():
    from fewstep_plugins.meanflow.jvp import use_backbone_jvp

    x0, e, t, r, y, drop = fixed_batch()
    z = interpolate(x0, e, t)
    assert use_backbone_jvp(small_dit(), "auto") and not use_backbone_jvp(small_dit(), "torch")
    assert not use_backbone_jvp(small_dit(dropout=0.2), "auto")  # falls back to torch.func.jvp
    with pytest.raises(ValueError, match="no forward_jvp"):
        u_and_dudt(TinyAttnNet().double(), z, t, r, y, z, impl="backbone")
    with pytest.raises(ValueError, match="deterministic"):
        u_and_dudt(small_dit(dropout=0.2), z, t, r, y, z, impl="backbone")
    with pytest.raises(ValueError, match="jvp_impl"):
        MeanFlow(CTX, jvp_impl="forward-ad")


@pytest.mark.parametrize("mode", ["single", "lean"])
def test_backbone_jvp_under_bf16_autocast(mode):
    """bf16 autocast (CPU): the hand-written JVP runs, its backward works in single mode (torch.func.jvp's does
    not under autocast), and du/dt stays within bf16 rounding of the float32 value."""
    net = small_dit(torch.float32)
    x0, e, t, r, y, _ = fixed_batch(dtype=torch.float32)
    z = interpolate(x0, e, t)
    v_g = torch.randn_like(z)
    _, ref = u_and_dudt(net, z, t, r, y, v_g, mode, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, dudt = u_and_dudt(net, z, t, r, y, v_g, mode, impl="backbone")
    u.float().pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    off = t != r
    assert (dudt[off].float() - ref[off]).norm() / ref[off].norm() < 3e-2


# -- the sampler (meanflow.py:102-124) -----------------------------------------------------------
def test_sampler_call_sequence_and_boundary():
    obj = MeanFlow(CTX)
    net = ConstantFields(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    e = torch.randn(3, 2, 4, 4)
    y = torch.tensor([0, 1, 2])
    x1 = MeanFlowSampler(CTX).sample(obj, net, e, y, nfe=1)
    assert [(c[1][0].item(), c[2][0].item()) for c in net.calls] == [(1.0, 0.0)]
    torch.testing.assert_close(x1, e - torch.tensor([0.5, 1.0, 1.5]).view(-1, 1, 1, 1))
    net.calls.clear()
    x2 = MeanFlowSampler(CTX).sample(obj, net, e, y, nfe=2)
    assert [(c[1][0].item(), c[2][0].item()) for c in net.calls] == [(1.0, 0.5), (0.5, 0.0)]
    torch.testing.assert_close(x2, x1)  # constant u: two half steps = one full step, no re-noising
    net.calls.clear()
    MeanFlowSampler(CTX).sample(obj, net, e, y, nfe=4)
    assert [round(c[1][0].item(), 6) for c in net.calls] == [1.0, 0.75, 0.5, 0.25]
    t = torch.rand(3)
    assert torch.equal(obj.flow_map(small_dit(torch.float32), e, t, t, y), e)  # f(x, t, t) == x exactly


def test_trainer_runs_meanflow(tmp_path, tiny):
    from fewstep.engine.trainer import Trainer

    recipe = tiny(objective={"name": "meanflow"}, sampler=None, train={"steps": 2}, eval={"nfe": [1, 2], "grid": 4})
    res = Trainer(recipe, tmp_path / "run", show_progress=False).run()
    assert res.step == 2 and {"loss", "mse", "sq_err_sum"} <= set(res.final_metrics) and len(res.grids) == 2


# -- DDP (py-meanflow README: the JVP bypasses DDP), 2 gloo processes on CPU ---------------------
class TinyAttnNet(torch.nn.Module):
    """net(x, t, s, y) with pixels as tokens and fused SDPA, conditioned on t, t - s and y (no timm import,
    so the spawned workers start fast)."""

    def __init__(self, channels=2, width=16, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.classes = classes
        self.inp, self.cond = torch.nn.Linear(channels, width), torch.nn.Linear(4, width)
        self.emb = torch.nn.Embedding(classes + 1, width)
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, channels)
        self.double()

    def forward(self, x, t, s, y):
        b, c, h, w = x.shape
        y = torch.full((b,), self.classes, dtype=torch.long) if y is None else y
        feats = torch.stack([t, t - s, torch.sin(3 * t), torch.cos(2 * (t - s))], 1)
        hid = torch.tanh(self.inp(x.flatten(2).transpose(1, 2)) + (self.cond(feats) + self.emb(y))[:, None])
        q, k, v = self.qkv(hid)[:, None].chunk(3, -1)  # one head
        a = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.out(a + hid).transpose(1, 2).reshape(b, c, h, w)


def _ddp_worker(rank, world, init_file, out_dir):
    done = False
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank=rank, world=world)
        x0, e, t, r, y, drop = fixed_batch(b=8)
        sl = slice(rank * 4, (rank + 1) * 4)
        for mode, kind in (("single", "tiny"), ("lean", "tiny"), ("single", "dit"), ("lean", "dit")):
            net = TinyAttnNet() if kind == "tiny" else small_dit()  # the DiT: forward_jvp + CFG reuse
            obj = MeanFlow(CTX, jvp_mode=mode)
            if obj.manual_grad_sync:  # what the engine does: no DDP wrapper, manual all-reduce
                broadcast_params(net, info)
                model = net
            else:
                model = torch.nn.parallel.DistributedDataParallel(net)
            obj.loss_core(model, x0[sl], e[sl], t[sl], r[sl], y[sl], drop[sl]).loss.backward()
            if obj.manual_grad_sync:
                all_reduce_grads([p for p in net.parameters()], info)
            torch.save(grads(net), f"{out_dir}/{mode}_{kind}_{rank}.pt")
            del model, net  # no DDP reducer may outlive the process group
        dist.barrier()
        done = True
    finally:
        dist.destroy_process_group()
    if done:
        # gloo's threads can abort the interpreter's teardown ("terminate called without an active
        # exception"); the results are on disk, so leave without running destructors
        os._exit(0)


def test_two_process_gloo_gradients_match_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x0, e, t, r, y, drop = fixed_batch(b=8)
    for mode, kind in (("single", "tiny"), ("lean", "tiny"), ("single", "dit"), ("lean", "dit")):
        net = TinyAttnNet() if kind == "tiny" else small_dit()
        MeanFlow(CTX, jvp_mode=mode).loss_core(net, x0, e, t, r, y, drop).loss.backward()
        ref = grads(net)
        g0, g1 = (torch.load(tmp_path / f"{mode}_{kind}_{k}.pt") for k in (0, 1))
        for k in ref:
            assert torch.equal(g0[k], g1[k]), (mode, k)
            torch.testing.assert_close(g0[k], ref[k], rtol=1e-9, atol=1e-12)


# -- compiling the backbone's JVP -------------------------------------------------------------------
def test_compiled_forward_jvp_traces_and_matches_eager(monkeypatch):
    """jvp_compile = 'on' runs forward_jvp through torch.compile (dynamo tracing; the aot_eager backend keeps
    this fast on CPU, inductor is what CUDA runs: docs/benchmarks.md checks it there to 9.6e-7 in fp32)."""
    import functools

    from fewstep_plugins.meanflow import jvp as J

    monkeypatch.setattr(J.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(J, "_COMPILED", J.weakref.WeakKeyDictionary())
    net = small_dit(torch.float32, attention="fused")
    x0, e, t, r, y, drop = fixed_batch(dtype=torch.float32)
    z = interpolate(x0, e, t)
    v_g = torch.randn_like(z)
    for mode in ("lean", "single"):
        u, dudt = u_and_dudt(net, z, t, r, y, v_g, mode, compile="on")
        u_ref, dudt_ref = u_and_dudt(net, z, t, r, y, v_g, mode, compile="off")
        torch.testing.assert_close(dudt, dudt_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-6)
        assert u.requires_grad and not dudt.requires_grad
    assert isinstance(J._COMPILED[net], J._CompiledJVP) and not J._COMPILED[net].failed


def test_compile_failure_falls_back_under_auto_and_raises_under_on(monkeypatch):
    from fewstep_plugins.meanflow import jvp as J

    def broken_compile(fn):
        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("Cannot find a working triton"), None)
        return run

    monkeypatch.setattr(J.torch, "compile", broken_compile)
    net = small_dit(torch.float32)
    x0, e, t, r, y, _ = fixed_batch(dtype=torch.float32)
    z = interpolate(x0, e, t)
    args = (z, t, r, y, z, torch.ones_like(t), torch.zeros_like(r))
    monkeypatch.setattr(J, "_COMPILED", J.weakref.WeakKeyDictionary())
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        J.backbone_jvp(net, "on", torch.device("cpu"))(*args)
    monkeypatch.setattr(J, "_COMPILED", J.weakref.WeakKeyDictionary())
    fn = J.backbone_jvp(net, "auto", torch.device("cuda"))  # 'auto' compiles for CUDA devices
    with pytest.warns(RuntimeWarning, match="triton.*running it eagerly"):
        out = fn(*args)
    torch.testing.assert_close(out[1], net.forward_jvp(*args)[1])
    assert J.backbone_jvp(net, "auto", torch.device("cpu")) == net.forward_jvp  # never compiled on CPU
