"""SoFlow, checked against the claims of the paper and the official code (docs/objectives/soflow.md)."""
import math

import pytest
import torch

from fewstep.interfaces import Batch, BuildContext, DataSpec
from fewstep.registry import Registry
from conftest import builtin, make_dit

SoFlow = builtin("objective", "soflow")
SoFlowSampler = builtin("sampler", "soflow")
from fewstep_plugins.soflow.scheduler import Scheduler, cfg_decay, r_schedule, sample_tsl

SPEC = DataSpec((2, 4, 4), 5)
CTX = BuildContext(data=SPEC, train_steps=100)
NO_CFG = dict(cfg_scale=1.0, cfg_drop=0.0, mix_ratio=1.0)
# the official constants as declared once (plugins/soflow/__init__.py): g(t)'s decay time 0.8 and k 0.025, gap 1e-4
DECLARED = Registry().get("objective", "soflow").options.resolve({})
DECAY = (DECLARED["cfg_decay_time"], DECLARED["cfg_decay_k"])
GAP = DECLARED["min_gap"]


class TinyNet(torch.nn.Module):
    """A small smooth network of (x, t, s, y), optionally with dropout."""

    def __init__(self, dropout=0.0, dtype=torch.float64):
        super().__init__()
        self.lin = torch.nn.Linear(32 + 3, 32, dtype=dtype)
        self.emb = torch.nn.Embedding(6, 1, dtype=dtype)
        self.drop = torch.nn.Dropout(dropout)
        self.calls = []

    def forward(self, x, t, s, y):
        self.calls.append(dict(grad=torch.is_grad_enabled(), x=x.detach().clone(), t=t.detach().clone(),
                               s=s.detach().clone(), y=None if y is None else y.clone()))
        b = x.shape[0]
        yv = self.emb(y if y is not None else torch.full((b,), 5)).view(b, 1)
        h = torch.cat([x.reshape(b, -1), t.view(b, 1), (t - s).view(b, 1), yv], 1)
        out = torch.tanh(self.lin(h))
        out = self.drop(out)
        self.calls[-1]["out"] = out.detach().clone()
        return out.view_as(x)


def random_dit(seed=0):
    torch.manual_seed(seed)
    net = make_dit(2, 4, 5, size="T/2", hidden=32, depth=1, heads=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)  # leave adaLN-Zero so F is not identically 0
    return net


# ---- parameterisation (models.py:9-120) -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["euler", "trig"])
def test_boundary_condition_holds_exactly(kind):
    obj = SoFlow(CTX, parameterization=kind)
    net = random_dit()
    x = torch.randn(6, 2, 4, 4)
    t = torch.rand(6)
    F = net(x, t, t, None)
    assert F.abs().max() > 0.1  # a real network output, not zeros
    assert torch.equal(obj.flow_map(net, x, t, t, None), x)  # f(x, t, t) == x, bit for bit


def test_velocity_readout_is_F_at_s_equal_t():
    obj = SoFlow(CTX)
    net = random_dit()
    x, t = torch.randn(3, 2, 4, 4), torch.rand(3)
    assert torch.equal(obj.velocity(net, x, t, None), net(x, t, t, None))


@pytest.mark.parametrize("kind", ["euler", "trig"])
def test_trig_and_euler_are_exact_for_a_point_mass(kind):
    """Data at a single point x0: F = (d/ds f) makes f carry x_t to x_s exactly along the path."""
    sch = Scheduler(kind)
    x0, e = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3, 0.8], dtype=torch.float64)
    s = torch.tensor([0.1, 0.2, 0.0, 0.79], dtype=torch.float64)
    x_t, x_s = sch.path(x0, e, t), sch.path(x0, e, s)
    if kind == "euler":
        F = e - x0  # f = x_t + (s - t)(e - x0) = x_s
    else:
        F = sch.path_velocity(x0, e, t) / sch.db_ds()  # rotation by pi/2 (s - t)
    torch.testing.assert_close(sch.f(x_t, F, t, s), x_s, rtol=1e-12, atol=1e-12)
    # velocity read-out = d x_t / dt
    torch.testing.assert_close(sch.velocity(F), sch.path_velocity(x0, e, t))


# ---- time sampling (train.py:224-266) -------------------------------------------------------------

def test_tsl_sampler_statistics_imagenet():
    torch.manual_seed(0)
    n = 1_000_000
    t, s, l = sample_tsl(n, r=0.1, t_mean=0.2, t_std=0.8, s_mean=-1.0, s_std=0.8, gap=GAP)
    degenerate = (s == t - 1e-4).float().mean().item()
    assert abs(degenerate - 0.145) < 0.002, degenerate
    assert (s < t).all()
    assert (l >= s).all() and (l <= t - 1e-4 + 1e-7).all()
    assert torch.equal(l[s == t - 1e-4], s[s == t - 1e-4])  # degenerate rows keep l = s
    q = torch.quantile(t[:100_000], torch.tensor([0.05, 0.5, 0.95]))
    torch.testing.assert_close(q, torch.tensor([0.25, 0.55, 0.82]), atol=0.02, rtol=0)


def test_tsl_no_sorting_cifar_fraction():
    torch.manual_seed(1)
    t, s, _ = sample_tsl(400_000, r=1.0, t_mean=-0.9, t_std=1.6, s_mean=-4.0, s_std=1.6, gap=GAP)
    assert abs((s == t - 1e-4).float().mean().item() - 0.085) < 0.003


def test_r_schedules_end_points_and_midpoint():
    K, ri, re = 400_000, 0.1, 0.002
    for kind in ("linear", "cosine", "exponent"):
        assert r_schedule(kind, 0, K, ri, re) == pytest.approx(ri)
        assert r_schedule(kind, K, K, ri, re) == pytest.approx(re)
    assert r_schedule("exponent", K // 2, K, ri, re) == pytest.approx(math.sqrt(ri * re))
    assert r_schedule("linear", K // 2, K, ri, re) == pytest.approx((ri + re) / 2)
    assert r_schedule("cosine", K // 2, K, ri, re) == pytest.approx((ri + re) / 2)
    assert r_schedule("const", 123, K, ri, re) == re
    # K matters at a fixed step (README tip: a 400k schedule beats an 800k one compared at 200k)
    assert r_schedule("exponent", 200_000, 400_000, ri, re) < r_schedule("exponent", 200_000, 800_000, ri, re)


def test_objective_uses_train_steps_when_total_steps_is_zero():
    assert SoFlow(CTX, total_steps=0).r(50) == pytest.approx(math.sqrt(0.1 * 0.002))
    assert SoFlow(CTX).total_steps == 400_000


def test_batch_split_by_index_fm_rows_first():
    obj = SoFlow(CTX, **NO_CFG)
    net = TinyNet(dtype=torch.float32)
    obj.loss(net, Batch(torch.randn(8, 2, 4, 4), torch.arange(8) % 5), step=0)
    (student,) = [c for c in net.calls if c["grad"]]
    assert torch.equal(student["s"][:6], student["t"][:6])  # floor(0.75 * 8) = 6 FM rows at s = t
    assert (student["s"][6:] < student["t"][6:]).all()


# ---- losses (models.py:122-207) -------------------------------------------------------------------

def fixed_inputs(B=8, nC=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    e = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (B,), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.15
    s = t.clone()
    s[B - nC:] = t[B - nC:] * torch.rand(nC, generator=g, dtype=torch.float64)
    l_c = t[B - nC:] - (t[B - nC:] - s[B - nC:]) * 0.3
    l_c[0] = s[B - nC]  # one degenerate row (l = s)
    dropped = torch.zeros(B, dtype=torch.bool)
    dropped[[1, B - 1]] = True
    return x0, y, e, t, s, l_c, dropped


def explicit_loss(obj, net, x0, y, e, t, s, l_c, dropped):
    """The explicit equivalent loss (docs/objectives/soflow.md), same gradient as the official surrogate."""
    B, nC = x0.shape[0], len(l_c)
    nF = B - nC
    sch = obj.sch
    y_in = torch.where(dropped, torch.full_like(y, 5), y)
    x_t, v = sch.path(x0, e, t), sch.path_velocity(x0, e, t)
    with torch.no_grad():
        v_u = sch.velocity(net(x_t, t, t, torch.full_like(y, 5)))
        v_c = sch.velocity(net(x_t, t, t, y))
    total = 0.0
    for i in range(B):
        g = cfg_decay(t[i:i + 1], *DECAY)[0] if obj.cfg_active else 0.0
        F_i = net(x_t[i:i + 1], t[i:i + 1], s[i:i + 1], y_in[i:i + 1])[0]
        if obj.cfg_active and not dropped[i]:
            v_g = v[i] + g * (obj.w - 1) * (v[i] - v_u[i])
            mix = sch.velocity(F_i).detach() if i < nF else v_c[i]
            v_tgt = obj.m * v_g + (1 - obj.m) * mix
        else:
            v_tgt = v[i]
        if i < nF:
            m_i = ((sch.velocity(F_i) - v_tgt) ** 2).mean()
            total = total + m_i / (sch.db_ds() * (m_i.detach() + obj.eps) ** obj.p)
        else:
            ti, si, li = t[i:i + 1], s[i:i + 1], l_c[i - nF:i - nF + 1]
            with torch.no_grad():
                x_l = x_t[i:i + 1] + (li - ti) * v_tgt
                f_l = sch.f(x_l, net(x_l, li, si, y_in[i:i + 1]), li, si)
            f_t = sch.f(x_t[i:i + 1], F_i[None], ti, si)
            q2 = (((f_t - f_l) / (ti - li)) ** 2).mean().detach()
            w = 1 / (q2 + obj.eps) ** obj.p
            b = sch.b(ti, si).abs()
            total = total + w * ((f_t - f_l) ** 2).mean() / (2 * b * (ti - li))[0]
    return total / B


def grads(net, loss):
    net.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("kind", ["euler", "trig"])
def test_gradient_equals_explicit_equivalent_loss(cfg, kind):
    torch.manual_seed(0)
    net = TinyNet()
    opts = {} if cfg else NO_CFG
    obj = SoFlow(CTX, parameterization=kind, p=0.75, eps=0.001, **opts)
    inputs = fixed_inputs()
    ours = grads(net, obj.loss_given(net, *inputs).loss)
    ref = grads(net, explicit_loss(obj, net, *inputs))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


def test_only_the_student_forward_carries_gradient():
    obj = SoFlow(CTX)  # CFG on, m != 1: v_u, v_c, student, teacher calls
    net = TinyNet()
    obj.loss_given(net, *fixed_inputs())
    graded = [c for c in net.calls if c["grad"]]
    assert len(graded) == 1 and len(net.calls) == 3  # student | v_u+v_c batched | teacher
    assert not any(c["grad"] for c in net.calls if c is not graded[0])


def test_adaptive_weight_is_detached_closed_form_gradients():
    """With F a free tensor: dL/dF = 2 w delta / (B D) on FM rows and sign(b) w q / (B D) on consistency rows."""
    B, nC = 6, 2
    P = torch.nn.Parameter(torch.randn(B, 2, 4, 4, dtype=torch.float64))

    class Free(torch.nn.Module):
        def forward(self, x, t, s, y):
            return P if torch.is_grad_enabled() else torch.zeros_like(x)  # teacher F_l = 0

    obj = SoFlow(CTX, p=1.0, eps=0.01, **NO_CFG)
    x0, y, e, t, s, l_c, dropped = fixed_inputs(B, nC)
    out = obj.loss_given(Free(), x0, y, e, t, s, l_c, torch.zeros(B, dtype=torch.bool))
    out.loss.backward()
    D = 32
    v = e - x0
    delta = P.detach()[:B - nC] - v[:B - nC]
    m = (delta ** 2).flatten(1).mean(1)
    w = 1 / (m + 0.01)
    torch.testing.assert_close(P.grad[:B - nC], (2 * w.view(-1, 1, 1, 1) * delta) / (B * D))
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * e
    tt, ss = t[B - nC:].view(-1, 1, 1, 1), s[B - nC:].view(-1, 1, 1, 1)
    ll = l_c.view(-1, 1, 1, 1)
    f_t = x_t[B - nC:] + (ss - tt) * P.detach()[B - nC:]
    f_l = x_t[B - nC:] + (ll - tt) * v[B - nC:]  # F_l = 0: f_l = x_l
    q = (f_t - f_l) / (tt - ll)
    wq = 1 / ((q ** 2).flatten(1).mean(1) + 0.01)
    torch.testing.assert_close(P.grad[B - nC:], -(wq.view(-1, 1, 1, 1) * q) / (B * D))
    # with p = 1 the weighted FM loss per row sits near 1 while the logged raw MSE varies
    assert out.metrics["fm_mse"] == pytest.approx(m.mean().item())


def test_teacher_reuses_the_students_dropout_masks():
    """x_l = x_t and l = t (v_tgt = 0): with shared masks the teacher output equals the student's."""
    net = TinyNet(dropout=0.5)
    obj = SoFlow(CTX, **NO_CFG)
    B, nC = 6, 3
    x0 = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    t = torch.full((B,), 0.5, dtype=torch.float64)
    s = t.clone()
    s[B - nC:] = 0.2
    obj.loss_given(net, x0, torch.zeros(B, dtype=torch.long), x0.clone(), t, s, t[B - nC:].clone(),
                   torch.zeros(B, dtype=torch.bool))  # e = x0 -> v = 0 -> x_l = x_t
    student, teacher = net.calls
    assert (student["out"] == 0).any()  # dropout really fired
    assert torch.equal(student["out"][B - nC:], teacher["out"][B - nC:])


# ---- training-time CFG (models.py:130-140, 170-182, 209-215) --------------------------------------

@pytest.mark.parametrize("t,g", [(0.5, 1.0), (0.8, 1.0), (0.801, 0.993), (0.81, 0.378), (0.82, 0.201),
                                 (0.85, 0.072), (0.9, 0.0247), (0.99, 0.0013), (1.0, 0.0)])
def test_cfg_decay_table(t, g):
    assert cfg_decay(torch.tensor([t], dtype=torch.float64), *DECAY).item() == pytest.approx(g, abs=6e-4)


def test_cfg_target_row_by_row_and_dropped_rows():
    obj = SoFlow(CTX, cfg_scale=3.0, mix_ratio=0.25)
    v, v_u, v_c = torch.full((3, 1), 2.0), torch.full((3, 1), 0.5), torch.full((3, 1), 1.0)
    t = torch.tensor([0.3, 0.81, 0.3])
    out = obj.guided_target(v, v_u, v_c, t, torch.tensor([False, False, True]))
    g = cfg_decay(t, *DECAY)
    expect = 0.25 * (2.0 + g * 2 * (2.0 - 0.5)) + 0.75 * 1.0
    torch.testing.assert_close(out[:2, 0], expect[:2])
    assert out[2, 0] == 2.0  # dropped row: raw v


def test_cfg_fixed_point_has_scale_w_independent_of_m():
    """Perfect learner on the FM branch: F <- m (v + (w - 1)(v - v_u)) + (1 - m) F  ->  v_u + w (v - v_u)."""
    for m in (0.25, 0.5, 1.0):
        obj = SoFlow(CTX, cfg_scale=3.0, mix_ratio=m)
        v, v_u = torch.tensor([[1.3]]), torch.tensor([[-0.4]])
        F = torch.zeros(1, 1)
        t = torch.tensor([0.5])
        for _ in range(200):
            F = obj.guided_target(v, v_u, F, t, torch.tensor([False]))
        torch.testing.assert_close(F, v_u + 3.0 * (v - v_u))


def test_cfg_config_assertions_and_unconditional_data():
    with pytest.raises(ValueError, match="cfg_drop"):
        SoFlow(CTX, cfg_scale=3.0, cfg_drop=0.0)
    with pytest.raises(ValueError, match="cfg_drop"):
        SoFlow(CTX, cfg_scale=1.0, cfg_drop=0.1)
    assert not SoFlow(BuildContext(data=DataSpec((2, 4, 4), 0))).cfg_active


def test_cfg_is_on_only_when_the_official_code_turns_it_on():
    """Official rule (models.py): guidance, label dropout and mixing happen iff labels exist and cfg_scale > 1.
    With w = 1, drop = 0 and the default m = 0.25 on labelled data the target is the plain v, not a damped one."""
    assert SoFlow(CTX).cfg_active  # w = 3
    obj = SoFlow(CTX, cfg_scale=1.0, cfg_drop=0.0)  # mix_ratio stays at its default 0.25
    assert obj.m == 0.25 and not obj.cfg_active
    net = random_dit().double()
    x0, y, e, t, s, l_c, _ = fixed_inputs()
    dropped = torch.zeros_like(_)  # what loss() passes when CFG is off: no row dropped
    got = obj.loss_given(net, x0, y, e, t, s, l_c, dropped)
    plain = SoFlow(CTX, cfg_scale=1.0, cfg_drop=0.0, mix_ratio=1.0).loss_given(net, x0, y, e, t, s, l_c, dropped)
    assert torch.equal(got.loss, plain.loss)  # m has no effect without guidance
    nF = x0.shape[0] - l_c.shape[0]
    x_t = (1 - t[:nF, None, None, None]) * x0[:nF] + t[:nF, None, None, None] * e[:nF]
    v_hat = net(x_t, t[:nF], t[:nF], y[:nF])  # no label is dropped either: y, not the null class
    assert torch.allclose(got.metrics["fm_mse"], ((v_hat - (e - x0)[:nF]) ** 2).mean(), rtol=1e-6)


def test_guidance_velocities_come_from_the_model_at_s_equal_t_with_null_and_true_labels():
    obj = SoFlow(CTX)
    net = TinyNet()
    x0, y, e, t, s, l_c, dropped = fixed_inputs()
    obj.loss_given(net, x0, y, e, t, s, l_c, dropped)
    guide = net.calls[0]
    assert not guide["grad"]
    B, nC = 8, 3
    assert torch.equal(guide["t"], guide["s"])  # velocities at s = t
    assert torch.equal(guide["y"][:B], torch.full((B,), 5))  # v_u: null class on every row
    assert torch.equal(guide["y"][B:], y[B - nC:])  # v_c: true labels on consistency rows


# ---- sampling (inference.py:61-88) ----------------------------------------------------------------

class ZeroNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, s, y):
        self.calls.append((t[0].item(), s[0].item()))
        return torch.zeros_like(x)


def test_one_nfe_is_e_minus_F():
    obj = SoFlow(CTX)
    net = random_dit()
    e = torch.randn(4, 2, 4, 4)
    out = SoFlowSampler(CTX).sample(obj, net, e, None, nfe=1)
    torch.testing.assert_close(out, e - net(e, torch.ones(4), torch.zeros(4), None))


def test_multistep_call_sequence_and_renoise_coefficients():
    obj = SoFlow(CTX)
    net = ZeroNet()
    e = torch.randn(3, 2, 4, 4)
    out = SoFlowSampler(CTX).sample(obj, net, e, None, nfe=2, generator=torch.Generator().manual_seed(7))
    assert net.calls == [(1.0, 0.0), (0.5, 0.0)]
    e2 = torch.randn(e.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, 0.5 * e + 0.5 * e2)  # F = 0: x0 = x, re-noised 0.5 x0 + 0.5 e'
    net.calls.clear()
    SoFlowSampler(CTX).sample(obj, net, e, None, nfe=3, generator=torch.Generator().manual_seed(7))
    assert [round(a, 6) for a, _ in net.calls] == [1.0, round(2 / 3, 6), round(1 / 3, 6)]
    assert all(b == 0.0 for _, b in net.calls)


def test_sampling_is_bit_identical_across_reruns():
    obj = SoFlow(CTX)
    net = random_dit()
    e = torch.randn(4, 2, 4, 4)
    a = SoFlowSampler(CTX).sample(obj, net, e, None, 2, torch.Generator().manual_seed(1))
    b = SoFlowSampler(CTX).sample(obj, net, e, None, 2, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_exact_solution_gives_exact_one_step_samples():
    """1-D Gaussian data N(mu, s0^2): with the closed-form F the 1-NFE sampler returns mu + s0 e."""
    mu, s0 = 0.7, 0.3

    class Exact(torch.nn.Module):
        def forward(self, x, t, s, y):
            tb, sb = t.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
            ratio = torch.sqrt(((1 - sb) ** 2 * s0 ** 2 + sb ** 2) / ((1 - tb) ** 2 * s0 ** 2 + tb ** 2))
            x_s = (1 - sb) * mu + ratio * (x - (1 - tb) * mu)
            return (x_s - x) / (sb - tb)

    obj = SoFlow(BuildContext(data=DataSpec((1, 1, 1), 0)))
    e = torch.randn(1000, 1, 1, 1, dtype=torch.float64)
    out = SoFlowSampler(obj.ctx).sample(obj, Exact(), e, None, nfe=1)
    torch.testing.assert_close(out, mu + s0 * e)


def test_unconditional_data_trains_without_labels():
    ctx = BuildContext(data=DataSpec((2, 4, 4), 0))
    obj = SoFlow(ctx)
    assert not obj.cfg_active
    net = TinyNet()
    out = obj.loss(net, Batch(torch.randn(8, 2, 4, 4, dtype=torch.float64), None), step=0)
    assert torch.isfinite(out.loss) and all(c["y"] is None for c in net.calls)
    assert len(net.calls) == 2  # student and teacher only: no guidance calls
