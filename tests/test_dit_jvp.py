"""DiT.forward_jvp (plugins/dit/jvp.py): the hand-written forward-mode derivative against torch.func.jvp."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import make_dit as DiT


def trained_like(attention="math", dtype=torch.float64, dropout=0.0, seed=0):
    """Depth 3, 16 tokens, 4 heads; every weight perturbed (adaLN-Zero would make the blocks identities)."""
    torch.manual_seed(seed)
    net = DiT(in_channels=3, image_size=8, num_classes=5, size="T/2", hidden=48, depth=3, heads=4,
              attention=attention, dropout=dropout)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.to(dtype)


def inputs(b=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype)
    s = t * torch.rand(b, generator=g, dtype=dtype)
    y = torch.randint(0, 6, (b,), generator=g)  # 5 = the null class
    tangents = (torch.randn(b, 3, 8, 8, generator=g, dtype=dtype), torch.randn(b, generator=g, dtype=dtype),
                torch.randn(b, generator=g, dtype=dtype))
    return x, t, s, y, tangents


def torch_jvp(net, x, t, s, y, tangents):
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        return torch.func.jvp(lambda a, b, c: net(a, b, c, y), (x, t, s), tangents)


@pytest.mark.parametrize("attention", ["math", "fused"])
def test_forward_jvp_equals_torch_func_jvp_in_float64(attention):
    net = trained_like(attention)
    x, t, s, y, tan = inputs()
    out_ref, d_ref = torch_jvp(net, x, t, s, y, tan)
    out, d = net.forward_jvp(x, t, s, y, *tan)
    assert d_ref.norm() > 1.0  # a non-trivial derivative
    assert float((d - d_ref).norm() / d_ref.norm()) < 1e-12
    assert torch.equal(out, net(x, t, s, y))  # the primal is the module's own forward, op for op
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)


def test_each_tangent_direction_and_the_null_label():
    """x only, t only (moves t and the gap t - s), s only (moves the gap alone), and y = None (null class)."""
    net = trained_like()
    x, t, s, _, (dx, dt, ds) = inputs()
    zero_x, zero_t = torch.zeros_like(dx), torch.zeros_like(dt)
    for tan in ((dx, zero_t, zero_t), (zero_x, dt, zero_t), (zero_x, zero_t, ds)):
        _, d_ref = torch_jvp(net, x, t, s, None, tan)
        _, d = net.forward_jvp(x, t, s, None, *tan)
        assert d_ref.norm() > 1e-3
        assert float((d - d_ref).norm() / d_ref.norm()) < 1e-12


def test_matches_a_central_difference():
    net = trained_like()
    x, t, s, y, (dx, dt, ds) = inputs()
    h = 1e-6
    with torch.no_grad():
        fd = (net(x + h * dx, t + h * dt, s + h * ds, y) - net(x - h * dx, t - h * dt, s - h * ds, y)) / (2 * h)
        _, d = net.forward_jvp(x, t, s, y, dx, dt, ds)
    assert float((d - fd).norm() / fd.norm()) < 1e-7


def test_primal_keeps_its_graph_and_the_tangent_has_none():
    net = trained_like("fused", torch.float32)
    x, t, s, y, tan = inputs(dtype=torch.float32)
    out, d = net.forward_jvp(x, t, s, y, *tan)
    assert out.requires_grad and not d.requires_grad
    out.pow(2).sum().backward()
    g_jvp = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net(x, t, s, y).pow(2).sum().backward()
    for n, p in net.named_parameters():
        assert torch.equal(g_jvp[n], p.grad), n


def test_bf16_autocast_stays_within_rounding():
    net = trained_like("fused", torch.float32)
    x, t, s, y, tan = inputs(dtype=torch.float32)
    _, d_ref = net.forward_jvp(x, t, s, y, *tan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, d = net.forward_jvp(x, t, s, y, *tan)
    assert d.dtype == torch.bfloat16
    assert 1e-4 < float((d.float() - d_ref).norm() / d_ref.norm()) < 3e-2  # rounded, but not far off


def test_active_dropout_is_refused_and_eval_mode_is_accepted():
    net = trained_like(dropout=0.1)
    x, t, s, y, tan = inputs()
    with pytest.raises(ValueError, match="deterministic"):
        net.forward_jvp(x, t, s, y, *tan)
    net.eval()
    _, d_ref = torch_jvp(net, x, t, s, y, tan)
    _, d = net.forward_jvp(x, t, s, y, *tan)
    assert float((d - d_ref).norm() / d_ref.norm()) < 1e-12
