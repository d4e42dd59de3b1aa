"""iMF (objective `imf`, sampler `imf`, backbone `imfdit`) against closed forms and the official formulas."""
import math

import pytest
import torch

from conftest import builtin
from fewstep.interfaces import Batch, BuildContext, DataSpec

CTX = BuildContext(data=DataSpec((1, 4, 4), 10))
UNCOND = BuildContext(data=DataSpec((1, 4, 4), 0))


def tiny_imfdit(dtype=torch.float64, perturb=0.2, **kw):
    opts = dict(size="T/2", hidden=16, heads=2, depth=3, aux_head_depth=1, class_tokens=2, cfg_tokens=1,
                interval_tokens=1, time_tokens=1)
    opts.update(kw)
    net = builtin("backbone", "imfdit")(CTX, **opts).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the zero-init gates and heads, so every path matters
        for p in net.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def guidance(b, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return dict(omega=1 + 7 * torch.rand(b, generator=g, dtype=dtype), t_min=0.5 * torch.rand(b, generator=g, dtype=dtype),
                t_max=0.5 + 0.5 * torch.rand(b, generator=g, dtype=dtype))


# -- backbone ----------------------------------------------------------------------------------------

def test_imfdit_at_init_outputs_zero_and_ignores_t():
    net = builtin("backbone", "imfdit")(CTX, size="T/2", hidden=16, heads=2, depth=2, aux_head_depth=1)
    x = torch.randn(3, 1, 4, 4)
    t = torch.rand(3)
    assert torch.equal(net(x, t, 0.5 * t), torch.zeros_like(x))  # zero final layer, zero gates
    net = tiny_imfdit()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t, h = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64)
    y = torch.tensor([1, 2, 10])
    a = net(x, t, t - h, y, **guidance(3))
    b = net(x, t - 0.05, t - 0.05 - h, y, **guidance(3))
    assert torch.equal(a, b)  # only the gap h = t - s is an input (official: no t)
    assert not torch.allclose(a, net(x, t, t - 0.5 * h, y, **guidance(3)))


def test_imfdit_sequence_layout_and_official_parameter_counts():
    net = builtin("backbone", "imfdit")(BuildContext(data=DataSpec((4, 32, 32), 1000)), size="B/2")
    assert net.prefix == 20 and net.rope_cos.shape[0] == 276  # 8 + 4 + 2 + 2 + 4 prefix tokens, 256 patches
    train = sum(p.numel() for p in net.parameters())
    eval_ = train - sum(p.numel() for p in net.v_heads.parameters()) - sum(p.numel() for p in net.v_final_layer.parameters())
    # closed form from the official layer definitions: per block 4d^2 + 3dm + 4d + 2 head_dim (m = 2048), 4 scalar
    # embedders (h, omega, t_min, t_max), the 1001-row label table, patch conv, final layers, 20 prefix tokens
    d, m = 768, 2048
    block = 4 * d * d + 3 * d * m + 4 * d + 2 * 64
    embedders = 4 * (256 * d + d + d * d + d) + 1001 * d + (16 * d + d) + 20 * d
    final = d + d * 16 + 16
    assert eval_ == 12 * block + embedders + final  # 88.94M: the paper's "89M" for iMF-B/2
    assert train == 20 * block + embedders + 2 * final
    lin = net.shared_blocks[0].attn.q_proj
    assert lin.bias is None and abs(lin.weight.std().item() - 0.32 / math.sqrt(768)) < 0.02 * 0.32 / math.sqrt(768)


def test_rope_is_a_rotation_of_adjacent_pairs():
    from fewstep_plugins.imf.model import apply_rope, rope_tables

    cos, sin = rope_tables(4, 3)
    x = torch.randn(1, 3, 1, 4, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    ang = 2.0 * 1.0  # position 2, pair 0: theta^0 = 1
    assert torch.allclose(out[0, 2, 0, 0], x[0, 2, 0, 0] * math.cos(ang) - x[0, 2, 0, 1] * math.sin(ang))
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))  # rotations keep norms
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is the identity


@pytest.mark.parametrize("attention", ["math", "fused"])
def test_hand_written_jvp_matches_torch_func_jvp_and_central_differences(attention):
    net = tiny_imfdit()
    net.set_attention(attention)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    dx = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64)
    r = t * torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 3, 10, 7])
    cond = guidance(4)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    u, du = net.forward_jvp(x, t, r, y, dx, one, zero, **cond)
    assert torch.allclose(u, net(x, t, r, y, **cond), atol=1e-14, rtol=0)
    net.set_attention("math")
    _, ref = torch.func.jvp(lambda a, b, c: net(a, b, c, y, **cond), (x, t, r), (dx, one, zero))
    assert (du - ref).abs().max() < 1e-12 * max(1.0, ref.abs().max().item())
    eps = 1e-5
    fd = (net(x + eps * dx, t + eps, r, y, **cond) - net(x - eps * dx, t - eps, r, y, **cond)) / (2 * eps)
    assert (du - fd).abs().max() < 1e-7 * max(1.0, fd.abs().max().item())


# -- the objective ---------------------------------------------------------------------------------------

def test_omega_sampler_matches_its_cdf():
    from fewstep_plugins.imf.objective import sample_omega

    torch.manual_seed(0)
    for beta, cdf in ((1.0, lambda w: math.log(w) / math.log(8)), (2.0, lambda w: (1 - 1 / w) / (1 - 1 / 8))):
        w = sample_omega(200_000, beta, 7.0, "cpu")
        assert w.min() >= 1 and w.max() <= 8
        for q in (1.5, 2.0, 2.83, 5.0):
            assert abs((w < q).double().mean().item() - cdf(q)) < 0.005


def test_batch_layout_fm_rows_interval_and_first_rows_dropped():
    obj = builtin("objective", "imf")(CTX)
    torch.manual_seed(0)
    t, r, fm = obj.sample_tr(10, "cpu")
    assert fm.tolist() == [True] * 5 + [False] * 5 and torch.equal(t[:5], r[:5]) and bool((r[5:] <= t[5:]).all())
    lo, hi = obj.sample_interval(10, fm)
    assert torch.equal(lo[:5], torch.zeros(5)) and torch.equal(hi[:5], torch.ones(5))
    assert bool((lo[5:] <= 0.5).all() and (hi[5:] >= 0.5).all())
    drop = obj.drop_mask(1000, "cpu")
    k = int(drop.sum())
    assert 50 < k < 150 and bool(drop[:k].all()) and not bool(drop[k:].any())


class StubHeads(torch.nn.Module):
    """u = 0; the v-head returns a known field of (z, omega, label): alpha z + omega * [label is real] c."""

    conditions = ("omega", "t_min", "t_max")
    has_v_head = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def field(self, z, y, omega):
        real = (y != 10).to(z.dtype).view(-1, 1, 1, 1)
        return 0.5 * z + omega.view(-1, 1, 1, 1) * real * 2.0

    def forward(self, x, t, s, y=None, omega=None, t_min=None, t_max=None):
        return self.w * x

    def forward_v(self, x, t, s, y=None, omega=None, t_min=None, t_max=None):
        assert torch.equal(t, s), "the velocity head is queried at gap 0"
        assert torch.equal(t_min, torch.zeros_like(t)) and torch.equal(t_max, torch.ones_like(t))
        self.calls.append(x.shape[0])
        return self.field(x, y, omega)

    def forward_uv(self, x, t, s, y=None, omega=None, t_min=None, t_max=None):
        return self.w * x, self.w * x + self.field(x, y, omega)


def test_guided_target_gate_and_dropped_rows_follow_the_official_formula():
    obj = builtin("objective", "imf")(CTX)
    net = StubHeads()
    b = 6
    z = torch.randn(b, 1, 4, 4, dtype=torch.float64)
    v = torch.randn(b, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.5, 0.4, 0.65, 0.65 + 1e-6, 0.2, 0.9], dtype=torch.float64)
    lo = torch.tensor([0.0, 0.4, 0.4, 0.4, 0.3, 0.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.65, 0.65, 0.65, 0.6, 1.0], dtype=torch.float64)
    omega = torch.tensor([3.0, 2.0, 4.0, 4.0, 5.0, 1.0], dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    v_g, v_c, v_u = obj.guidance(net, z, v, t, y, omega, lo, hi, {})
    on = torch.tensor([True, True, True, False, False, True])  # inclusive gate on the row's own t
    w_g = torch.where(on, omega, torch.ones_like(omega)).view(-1, 1, 1, 1)
    c_true = 0.5 * z + w_g * 2.0  # the conditional head at w_g
    u_true = 0.5 * z  # null label, omega 1: 0.5 z
    assert torch.allclose(v_c, c_true) and torch.allclose(v_u, u_true)
    assert torch.allclose(v_g, v + (1 - 1 / w_g) * (c_true - u_true))
    assert torch.equal(v_g[3], v[3]) and torch.equal(v_g[4], v[4])  # gate off: exactly unguided
    assert torch.equal(v_g[5], v[5])  # omega = 1: exactly v
    assert net.calls == [2 * b, 2]  # one doubled pass, then the gate-off rows at w_g = 1


def test_guidance_fixed_point_is_the_cfg_field():
    """Training the v-head to its own target: head <- v + (1 - 1/w)(head_c - head_u) in expectation, i.e.
    E[v | z, y] + (1 - 1/w)(head_c - head_u). With head_u = E[v | z] the fixed point is head_c =
    E[v|z] + w (E[v|z,y] - E[v|z]), the CFG field of scale w."""
    vc_true, vu_true, w = torch.tensor(1.3), torch.tensor(-0.4), 3.0
    head_c = torch.tensor(0.0)
    for _ in range(200):
        head_c = vc_true + (1 - 1 / w) * (head_c - vu_true)
    assert torch.allclose(head_c, vu_true + w * (vc_true - vu_true), atol=1e-10)


def test_loss_gradient_is_the_meanflow_form_with_the_predicted_tangent():
    """For a fixed tangent the gradient of err(V)/sg(err + eps) equals that of MeanFlow's
    ||u - sg(v_g - (t - r) du/dt)||^2 with the same weight; with tangent = boundary the tangent is u(z, t, t)."""
    torch.manual_seed(0)
    net = tiny_imfdit(aux_head_depth=0, attention="math")
    obj = builtin("objective", "imf")(CTX, tangent="boundary", class_drop=0.0)
    b = 4
    x0, e = torch.randn(b, 1, 4, 4, dtype=torch.float64), torch.randn(b, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.8, 0.6, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.8, 0.2, 0.1, 0.3], dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    g = guidance(b)
    out = obj.loss_core(net, x0, e, t, r, y, None, g["omega"], g["t_min"], g["t_max"])
    grads = torch.autograd.grad(out.loss, list(net.parameters()))
    # reference: explicit MeanFlow-form loss with v_c = u(z, t, t | omega, 0, 1, y)
    z, v = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * e, e - x0
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    with torch.no_grad():
        v_c0 = net(z, t, t, y, omega=g["omega"], t_min=zeros, t_max=ones)
        v_u = net(z, t, t, torch.full_like(y, 10), omega=ones, t_min=zeros, t_max=ones)
        on = (t >= g["t_min"]) & (t <= g["t_max"])
        w_g = torch.where(on, g["omega"], ones)
        v_c = net(z, t, t, y, omega=w_g, t_min=zeros, t_max=ones)
        v_g = v + (1 - 1 / w_g).view(-1, 1, 1, 1) * (v_c - v_u)
        cond = dict(g)
        _, dudt = torch.func.jvp(lambda a, b_, c: net(a, b_, c, y, **cond), (z, t, r), (v_c, ones, zeros))
    u = net(z, t, r, y, **cond)
    h = (t - r).view(-1, 1, 1, 1)
    tgt = (v_g - h * dudt).detach()
    err = (u - tgt).pow(2).flatten(1).sum(1)
    ref = (err / (err.detach() + 0.01)).mean()
    assert torch.allclose(out.loss, ref, rtol=1e-12)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    for a, bb in zip(grads, ref_grads):
        assert torch.allclose(a, bb, rtol=1e-9, atol=1e-14)
    del v_c0


def test_v_head_loss_has_both_terms_and_only_primal_gradients():
    torch.manual_seed(0)
    net = tiny_imfdit()
    obj = builtin("objective", "imf")(CTX)
    out = obj.loss(net, Batch(torch.randn(8, 1, 4, 4, dtype=torch.float64), torch.randint(0, 10, (8,))), 0)
    assert set(out.metrics) == {"loss_u", "loss_v"}
    assert 0 < out.loss.item() < 2  # each term err / (err + 0.01) < 1
    out.loss.backward()
    assert net.v_heads[0].mlp.w2.weight.grad.abs().sum() > 0 and net.u_heads[0].mlp.w2.weight.grad.abs().sum() > 0


def gaussian_u(z, t, r, s):
    """Exact average velocity for data N(0, s^2), noise N(0, 1): u = z (1 - sqrt(V(r) / V(t))) / (t - r)."""
    V = lambda a: (1 - a) ** 2 * s ** 2 + a ** 2  # noqa: E731
    tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    gap = (tt - rr)
    ratio = torch.sqrt(V(rr) / V(tt))
    inst = (tt - (1 - tt) * s ** 2) / V(tt) * z  # the marginal velocity (the limit r -> t)
    return torch.where(gap > 0, z * (1 - ratio) / torch.where(gap > 0, gap, torch.ones_like(gap)), inst)


class GaussianNet(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t, s_, y=None):
        return gaussian_u(x, t, s_, self.s) + self.dummy * x


@pytest.mark.parametrize("s", [0.5, 0.9])
def test_gaussian_exact_average_velocity_makes_V_the_marginal_velocity(s):
    """The compound V = u + (t - r) du/dt along the exact marginal velocity (the boundary tangent u(z, t, t))
    equals the marginal velocity v(z, t) to 1e-8: the population loss is at its minimum at the exact u."""
    net = GaussianNet(s)
    obj = builtin("objective", "imf")(UNCOND, tangent="boundary", class_drop=0.0)
    torch.manual_seed(0)
    b = 64
    z = torch.randn(b, 1, 4, 4, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(b, dtype=torch.float64)
    r = t * torch.rand(b, dtype=torch.float64)
    v_c = net(z, t, t)
    dudt = obj.u_dudt(net, z, t, r, None, v_c, {})
    V = net(z, t, r) + (t - r).view(-1, 1, 1, 1) * dudt
    assert (V - v_c).abs().max() < 1e-8


def test_zero_loss_gradient_in_expectation_at_the_exact_solution():
    """At the exact u of a Gaussian toy, the u-loss gradient wrt the output, 2 (V - v) / (err + eps), averages to
    ~0 over e given z: V = E[v | z] and v - E[v | z] has mean zero. Checked with the residual V - v on many e."""
    s = 0.7
    net = GaussianNet(s)
    obj = builtin("objective", "imf")(UNCOND, tangent="boundary", class_drop=0.0, fm_share=0.0)
    torch.manual_seed(0)
    b = 200_000
    x0 = s * torch.randn(b, 1, 1, 1, dtype=torch.float64)
    e = torch.randn(b, 1, 1, 1, dtype=torch.float64)
    t = torch.full((b,), 0.6, dtype=torch.float64)
    r = torch.full((b,), 0.2, dtype=torch.float64)
    z = (1 - 0.6) * x0 + 0.6 * e
    v = e - x0
    dudt = obj.u_dudt(net, z, t, r, None, net(z, t, t), {})
    V = net(z, t, r) + 0.4 * dudt
    resid = (V - v).flatten()
    # E[(V - v) z] = 0 (the residual is orthogonal to functions of z) and E[V - v] = 0
    assert abs(resid.mean().item()) < 0.01 and abs((resid * z.flatten()).mean().item()) < 0.01


# -- sampler --------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    conditions = ("omega", "t_min", "t_max")

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, s, y=None, omega=None, t_min=None, t_max=None):
        self.calls.append((t.clone(), s.clone(), omega.clone(), t_min.clone(), t_max.clone(), x.clone()))
        return torch.ones_like(x)


def test_sampler_call_sequence_with_sampling_time_guidance():
    obj = builtin("objective", "imf")(CTX)
    smp = builtin("sampler", "imf")(CTX, omega=8.0, t_min=0.4, t_max=0.65)
    net = Recorder()
    noise = torch.randn(3, 1, 4, 4)
    y = torch.tensor([0, 1, 2])
    out = smp.sample(obj, net, noise, y, 2)
    assert len(net.calls) == 2
    for k, (t, s, om, lo, hi, _) in enumerate(net.calls):
        assert torch.allclose(t - s, torch.full((3,), 0.5)) and torch.allclose(t, torch.full((3,), 1 - 0.5 * k))
        assert torch.equal(om, torch.full((3,), 8.0)) and torch.allclose(lo, torch.full((3,), 0.4))
        assert torch.allclose(hi, torch.full((3,), 0.65))
    assert torch.allclose(net.calls[1][5], noise - 0.5) and torch.allclose(out, noise - 1.0)
    net = Recorder()
    smp.sample(obj, net, noise, y, 1)
    assert len(net.calls) == 1 and torch.allclose(net.calls[0][0] - net.calls[0][1], torch.ones(3))


def test_trains_a_few_steps_from_a_recipe(tiny, tmp_path):
    from fewstep.api import Trainer

    r = tiny(backbone={"name": "imfdit", "size": "T/2", "hidden": 32, "heads": 2, "depth": 2, "aux_head_depth": 1},
             objective={"name": "imf"}, sampler={"name": "imf", "omega": 2.0}, train={"steps": 3})
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert res.step == 3 and math.isfinite(res.final_metrics["loss_u"])
