"""The DiT backbone: shapes, the two time inputs, adaLN-Zero, attention paths, sizes."""
import pytest
import torch

from conftest import make_dit as DiT
from fewstep_plugins.dit.model import TimestepEmbedder, parse_size


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


def official_pos_embed(embed_dim: int, grid_size: int):
    """The official DiT / SoFlow / MeanFlow get_2d_sincos_pos_embed, re-derived step by step in numpy:
    grid = meshgrid(grid_w, grid_h) (w first), half the channels from grid[0] (the column index w), half
    from grid[1] (the row index h); each 1-D half is [sin(pos * omega), cos(pos * omega)]."""
    import numpy as np

    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,grid", [(32, 4), (768, 16), (1152, 16)])
def test_position_embedding_has_the_official_layout(dim, grid):
    from fewstep_plugins.dit.model import sincos_2d

    ours = sincos_2d(dim, grid).double().numpy()
    ref = official_pos_embed(dim, grid)
    assert ours.shape == ref.shape == (grid * grid, dim)
    assert abs(ours - ref).max() < 1e-6  # float32 buffer of the float64 formula
    # token 1 is row 0, column 1: the first half (column) changes, the second half (row) does not
    assert abs(ours[1, dim // 2:] - ours[0, dim // 2:]).max() == 0
    assert abs(ours[1, : dim // 2] - ours[0, : dim // 2]).max() > 0.1


def test_gap_embedder_init_follows_the_option():
    torch.manual_seed(0)
    xavier = small(hidden=64)
    torch.manual_seed(0)
    normal = small(hidden=64, gap_init="normal")
    for net in (xavier, normal):  # the t embedder is N(0, 0.02) in both official DiTs
        assert abs(net.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.003
    assert abs(normal.s_embedder.mlp[0].weight.std().item() - 0.02) < 0.003
    bound = (6 / (256 + 64)) ** 0.5  # xavier uniform on Linear(256, 64): std = bound / sqrt(3)
    assert abs(xavier.s_embedder.mlp[0].weight.std().item() - bound / 3 ** 0.5) < 0.005
    assert xavier.s_embedder.mlp[0].weight.abs().max() <= bound
