"""The DiT backbone: shapes, the two time inputs, adaLN-Zero, attention paths, sizes."""
import pytest
import torch

from fewstep_plugins.dit.model import DiT, TimestepEmbedder, parse_size


def small(**kw):
    args = dict(in_channels=3, image_size=8, num_classes=10, size="T/2", hidden=32, depth=2, heads=2)
    args.update(kw)
    return DiT(**args)


def test_output_shape_and_null_class():
    net = small()
    x = torch.randn(5, 3, 8, 8)
    t, s = torch.rand(5), torch.rand(5) * 0.5
    assert net(x, t, s, torch.randint(0, 10, (5,))).shape == x.shape
    assert net(x, t, s, None).shape == x.shape
    assert net.y_embedder.num_embeddings == 11  # 10 classes + the null row


def test_embedders_receive_raw_t_and_the_gap():
    net = small()
    seen = {}
    net.t_embedder.register_forward_hook(lambda m, inp, out: seen.__setitem__("t", inp[0].clone()))
    net.s_embedder.register_forward_hook(lambda m, inp, out: seen.__setitem__("gap", inp[0].clone()))
    t = torch.tensor([0.9, 0.5, 0.3])
    s = torch.tensor([0.1, 0.5, 0.0])
    net(torch.randn(3, 3, 8, 8), t, s, None)
    assert torch.equal(seen["t"], t)  # raw t in [0, 1], no x1000
    assert torch.equal(seen["gap"], t - s)  # the gap, not s


def test_adaln_zero_init_outputs_zero_and_blocks_are_identity():
    net = small()
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.rand(2), torch.rand(2), None)
    assert torch.count_nonzero(out) == 0
    for blk in net.blocks:
        assert torch.count_nonzero(blk.adaLN_modulation[-1].weight) == 0


def test_init_t_mlp_normal_gap_mlp_xavier():
    net = DiT(4, 32, 1000, size="B/4")
    assert abs(net.t_embedder.mlp[0].weight.std().item() - 0.02) < 2e-3
    w = net.s_embedder.mlp[0].weight  # xavier uniform: std = sqrt(2 / (fan_in + fan_out))
    assert abs(w.std().item() - (2 / (256 + 768)) ** 0.5) < 2e-3


def test_fused_and_math_attention_agree():
    torch.manual_seed(1)
    net = small()
    for p in net.parameters():  # leave adaLN-Zero so the output is not trivially 0
        torch.nn.init.normal_(p, std=0.1)
    x, t, s = torch.randn(4, 3, 8, 8), torch.rand(4), torch.rand(4)
    net.set_attention("fused")
    a = net(x, t, s, None)
    net.set_attention("math")
    b = net(x, t, s, None)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_timestep_features_cos_then_sin():
    f = TimestepEmbedder.features(torch.tensor([0.0, 1.0]), 8)
    assert torch.allclose(f[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 4)
    assert torch.allclose(f[1], torch.cat([freqs.cos(), freqs.sin()]))


@pytest.mark.parametrize("size,params_m", [("B/4", 130.5), ("B/2", 130.5), ("XL/2", 675.1)])
def test_paper_sizes_match_dit_parameter_counts(size, params_m):
    """DiT's published counts (learn_sigma off) plus one extra time embedder (256*D + D + D*D + D)."""
    with torch.device("meta"):
        net = DiT(4, 32, 1000, size=size)
    d = net.hidden
    extra = 256 * d + d + d * d + d
    n = sum(p.numel() for p in net.parameters()) - extra
    assert abs(n / 1e6 - params_m) < 0.6, n


def test_parse_size():
    assert parse_size("XL/2") == (28, 1152, 16, 2)
    assert parse_size("M/2") == (16, 1024, 16, 2)
    with pytest.raises(ValueError, match="unknown DiT size"):
        parse_size("Q/2")
