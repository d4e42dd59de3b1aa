"""The `unet` backbone (plugins/unet): official sizes and layout, the two times, labels, augmentation labels,
init, attention paths, forward-mode AD, torch.compile, option errors, and training through the Trainer."""
import math
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.api import BuildContext, DataSpec, OptionError, RecipeError, Registry, Trainer, recipe_from_dict
from fewstep_plugins.unet.layers import PositionalEmbedding, fir_kernel, fir_resample

# a small config that keeps every kind of layer: 2 levels (down, up), attention at 8x8 and in the middle
TINY = dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8],
            dropout=0.0, resample_filter=[1, 3, 3, 1])


def unet(shape=(3, 16, 16), num_classes=0, **options):
    return Registry().get("backbone", "unet").create(BuildContext(data=DataSpec(shape, num_classes)), **options)


def perturbed(net, scale=0.05, seed=0):
    """Every weight moved off its init (the near-zero last layers would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def inputs(b=4, shape=(3, 16, 16), dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, generator=g, dtype=dtype)
    return torch.randn(b, *shape, generator=g, dtype=dtype), t, t * torch.rand(b, generator=g, dtype=dtype)


def count(net):
    return sum(p.numel() for p in net.parameters())


# --- sizes and layout against the official code ---------------------------------------------------------

# Official counts, from instantiating the official classes: NVlabs/edm training/networks.py SongUNet with
# train.py's ddpmpp / ncsnpp settings (ECT's ct_train.py is the same), and SoFlow models.py's SongUNet
# (py-meanflow's gives the same count). The EDM networks embed one time; fewstep's concatenates the
# features of t and t - s, so map_layer0 reads 2 x noise features: + noise x emb weights, and the
# augmentation map is twice as wide: + augment_dim x noise.
@pytest.mark.parametrize("options,official,extra", [
    ({}, 55_732_739, 128 * 512),  # ECT's DDPM++ ("55.7M"): no augmentation, channel_mult_noise 1
    (dict(channel_mult_noise=2, augment_dim=6, resample_filter=[1, 3, 3, 1], dropout=0.3), 55_932_419, 0),  # SoFlow
    (dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
          augment_dim=9), 56_397_827, 256 * 512 + 9 * 256),  # EDM's NCSN++ (augmentation on)
])
def test_parameter_counts_match_the_official_networks(options, official, extra):
    with torch.device("meta"):
        net = unet((3, 32, 32), **options)
    assert count(net) == official + extra


def test_state_dict_has_the_official_layout():
    """Key names and shapes of the official SongUNet (SoFlow's CIFAR network has 425 entries), so official
    weights load with load_state_dict."""
    with torch.device("meta"):
        net = unet((3, 32, 32), channel_mult_noise=2, augment_dim=6, resample_filter=[1, 3, 3, 1])
    sd = net.state_dict()
    assert len(sd) == 425
    expected = {
        "map_augment.weight": (512, 6), "map_layer0.weight": (512, 512), "map_layer1.bias": (512,),
        "enc.32x32_conv.weight": (128, 3, 3, 3), "enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "enc.16x16_down.conv0.resample_filter": (1, 1, 4, 4), "enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "enc.16x16_block3.proj.weight": (256, 256, 1, 1), "dec.8x8_in0.norm2.weight": (256,),
        "dec.16x16_up.skip.resample_filter": (1, 1, 4, 4), "dec.16x16_block4.qkv.bias": (768,),
        "dec.32x32_block0.norm0.weight": (512,), "dec.32x32_aux_norm.weight": (256,),
        "dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "map_label.weight" not in sd and "enc.32x32_block1.skip.weight" not in sd  # no labels; same width


def fixed_weights(net):
    """Every weight and bias (and the Fourier frequencies) set by a formula of its sorted state-dict position:
    the output then depends on the architecture only, not on the init or the random stream."""
    sd = {}
    for i, (k, v) in enumerate(sorted(net.state_dict().items())):
        if "resample_filter" in k:
            sd[k] = v
            continue
        fan = v.shape[-1] if v.ndim == 2 else v[0].numel() if v.ndim == 4 else 1
        sd[k] = (0.2 * torch.sin(0.37 * torch.arange(v.numel(), dtype=torch.float64) + i)).reshape(v.shape) / math.sqrt(fan)
    if "map_gap.freqs" in sd:  # the official networks have one map_noise for both times
        sd["map_gap.freqs"] = sd["map_noise.freqs"]
    net.load_state_dict(sd)
    return net


# Reference outputs of the official SongUNet (SoFlow's unet.py: EDM's with the features of t and t - s
# concatenated) in float64 (its float32 attention and frequencies switched to float64), loaded with
# fixed_weights' state dict; this implementation agreed with it to 3e-15 in every case. Each row:
# options, sum(out), sum(out^2), out[2, 1, 5, :3].
OFFICIAL = [
    (dict(channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),  # SoFlow's settings, smaller
     169.5582521131981, 19.336010102359076, [0.06043769982252879, 0.05755722797302985, 0.05744180227268684]),
    (dict(embedding_type="fourier", encoder_type="residual", decoder_type="skip", attn_resolutions=[16],
          resample_filter=[1, 1]),
     -192.87853708939127, 33.66907321409678, [-0.08154147797185132, -0.07509374496528147, -0.07335921547174157]),
    (dict(encoder_type="skip", channel_mult=[1, 1], attn_resolutions=[], resample_filter=[1, 3, 3, 1]),
     170.12430017855945, 19.441150547129013, [0.059739891661639, 0.056635000449058386, 0.056495054165777464]),
]


@pytest.mark.parametrize("options,total,squares,row", OFFICIAL)
def test_matches_the_official_network_on_fixed_weights(options, total, squares, row):
    net = unet(augment_dim=2, **{**TINY, "channel_mult_noise": 1, **options}).double().eval()
    fixed_weights(net)
    x = torch.sin(torch.arange(3 * 3 * 16 * 16, dtype=torch.float64) * 0.731).reshape(3, 3, 16, 16)
    t, s = torch.tensor([0.9, 0.4, 0.05], dtype=torch.float64), torch.tensor([0.1, 0.4, 0.0], dtype=torch.float64)
    aug = torch.tensor([[0.5, -1.0], [0.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        out = net(x, t, s, None, augment_labels=aug)
    assert float(out.sum()) == pytest.approx(total, rel=1e-10)
    assert float(out.square().sum()) == pytest.approx(squares, rel=1e-10)
    assert out[2, 1, 5, :3].tolist() == pytest.approx(row, rel=1e-9)


# --- the contract ---------------------------------------------------------------------------------------

def test_output_shape_for_grey_8x8_and_rgb_16x16():
    digits = unet((1, 8, 8), 10, **{**TINY, "attn_resolutions": [4]})
    x, t, s = inputs(5, (1, 8, 8))
    assert digits(x, t, s, torch.randint(0, 11, (5,))).shape == x.shape
    assert digits(x, t, s, None).shape == x.shape
    x, t, s = inputs(2, (3, 16, 16))
    assert unet(**TINY)(x, t, s).shape == x.shape


def test_time_features_receive_raw_t_and_the_gap():
    net = unet(**TINY)
    seen = {}
    net.map_noise.register_forward_hook(lambda m, inp, out: seen.__setitem__("t", inp[0].clone()))
    net.map_gap.register_forward_hook(lambda m, inp, out: seen.__setitem__("gap", inp[0].clone()))
    t, s = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.1, 0.5, 0.0])
    net(torch.randn(3, 3, 16, 16), t, s)
    assert torch.equal(seen["t"], t)  # raw t in [0, 1]
    assert torch.equal(seen["gap"], t - s)  # the gap, not s
    assert net.map_layer0.in_features == 2 * 16  # the two features are concatenated, each model_channels wide


def test_positional_features_are_sin_then_cos_with_end_point_frequencies():
    f = PositionalEmbedding(8)(torch.tensor([0.0, 1.0]))
    assert torch.equal(f[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = 1e4 ** (-torch.arange(4) / 3)  # 1, ..., 1e-4: the last frequency reaches the end point
    torch.testing.assert_close(f[1], torch.cat([freqs.sin(), freqs.cos()]))


def test_class_labels_change_the_output_and_the_null_class_is_the_zero_one_hot():
    net = perturbed(unet(num_classes=10, **TINY))
    x, t, s = inputs(3)
    seen = []
    net.map_label.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    a = net(x, t, s, torch.tensor([0, 3, 10]))
    b = net(x, t, s, torch.tensor([1, 3, 10]))
    assert (a[0] - b[0]).abs().max() > 1e-3 and torch.equal(a[1:], b[1:])  # rows are independent
    expected = torch.zeros(3, 10)
    expected[0, 0] = expected[1, 3] = math.sqrt(10)  # one-hot times sqrt(num_classes); the null class: zeros
    assert torch.equal(seen[0], expected)
    torch.testing.assert_close(net(x, t, s, None), net(x, t, s, torch.full((3,), 10)))  # None = all null
    assert unet(num_classes=0, **TINY).map_label is None  # unconditional: no label embedding at all


def test_augmentation_labels_change_the_output_and_none_equals_zeros():
    net = perturbed(unet(augment_dim=6, **TINY))
    assert net.conditions == ("augment_labels",)
    x, t, s = inputs(3)
    zeros = net(x, t, s, None, augment_labels=torch.zeros(3, 6))
    torch.testing.assert_close(net(x, t, s), zeros, rtol=0, atol=0)
    moved = net(x, t, s, None, augment_labels=torch.randn(3, 6))
    assert (moved - zeros).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"augment_labels must be \(B, 6\)"):
        net(x, t, s, None, augment_labels=torch.zeros(3, 9))
    with pytest.raises(ValueError, match="augment_dim = 0"):
        unet(**TINY)(x, t, s, None, augment_labels=torch.zeros(3, 6))


# --- init -----------------------------------------------------------------------------------------------

def test_last_layers_start_near_zero_as_officially_initialised():
    """The official init scales the last conv of every residual branch (conv1, attention proj) and the output
    conv by 1e-5 (xavier-uniform x 1e-5), not by 0: the output at init is tiny but not zero."""
    net = unet(**TINY)
    for name, w in [("dec.16x16_aux_conv", net.dec["16x16_aux_conv"].weight),
                    ("conv1", net.enc["16x16_block0"].conv1.weight), ("proj", net.enc["8x8_block0"].proj.weight)]:
        fan = (w.shape[0] + w.shape[1]) * w.shape[2] * w.shape[3]
        bound = 1e-5 * math.sqrt(6 / fan)  # xavier-uniform bound, times 1e-5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, name
    qkv = net.enc["8x8_block0"].qkv.weight
    assert qkv.abs().max() <= math.sqrt(0.2) * math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))  # gain sqrt(0.2)
    out = net(*inputs(4))
    assert 0 < out.abs().max() < 1e-4


def test_a_gradient_reaches_every_parameter_after_one_step():
    torch.manual_seed(0)
    net = unet(num_classes=10, augment_dim=6, **TINY)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t, s = inputs(4)
    y, aug = torch.tensor([0, 4, 9, 10]), torch.randn(4, 6)
    for step in range(2):  # step 0 moves the near-zero output layer; step 1 is the one checked
        opt.zero_grad()
        loss = (net(x, t, s, y, augment_labels=aug) - x).square().mean()
        loss.backward()
        if step == 0:
            opt.step()
    assert net(x, t, s, y, augment_labels=aug).abs().max() > 1e-3
    dead = [n for n, p in net.named_parameters() if p.grad is None or not torch.all(torch.isfinite(p.grad))
            or p.grad.abs().max() == 0]
    assert not dead


# --- attention, forward-mode AD, compile, memory format -----------------------------------------------

def test_fused_and_math_attention_agree():
    net = perturbed(unet(**TINY))
    x, t, s = inputs(4)
    net.set_attention("fused")
    a = net(x, t, s)
    net.set_attention("math")
    b = net(x, t, s)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["fused", "math"])
def test_torch_func_jvp_matches_a_central_difference_in_float64(attention):
    """MeanFlow's target needs d/dt net along (dx, dt, ds); fused attention runs SDPA's math backend."""
    net = perturbed(unet(num_classes=5, augment_dim=3, attention=attention, **TINY)).double().eval()
    x, t, s = inputs(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    y, aug = torch.tensor([0, 2, 5]), torch.randn(3, 3, generator=g, dtype=torch.float64)
    dx, dt, ds = (torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64),
                  torch.randn(3, generator=g, dtype=torch.float64))
    f = lambda a, b, c: net(a, b, c, y, augment_labels=aug)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        out, d = torch.func.jvp(f, (x, t, s), (dx, dt, ds))
        h = 1e-6
        fd = (f(x + h * dx, t + h * dt, s + h * ds) - f(x - h * dx, t - h * dt, s - h * ds)) / (2 * h)
    torch.testing.assert_close(out, f(x, t, s), rtol=1e-12, atol=1e-12)
    assert fd.norm() > 0.1
    assert float((d - fd).norm() / fd.norm()) < 1e-7


def test_torch_compile_traces_the_whole_forward():
    torch._dynamo.reset()
    net = perturbed(unet(num_classes=10, augment_dim=2, **{**TINY, "channel_mult": [1, 1], "model_channels": 8}))
    x, t, s = inputs(2)
    y, aug = torch.tensor([3, 10]), torch.randn(2, 2)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # fullgraph: no graph breaks
    torch.testing.assert_close(compiled(x, t, s, y, augment_labels=aug), net(x, t, s, y, augment_labels=aug))


def test_channels_last_gives_the_same_numbers():
    net = perturbed(unet(**TINY))
    x, t, s = inputs(3)
    ref = net(x, t, s)
    net.channels_last = True
    out = net(x, t, s)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_activation_keeps_the_layout_asked_for(channels_last):
    """The attention output is a transposed view (channels-last strides); it goes back to the network's layout, so
    a channels_last = false network stays in the standard layout throughout (and dropout draws its masks in the
    same order as the official code's), and a channels_last = true one stays channels-last."""
    net = perturbed(unet(**TINY))
    net.channels_last = channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append((type(m).__name__, out)))
             for m in net.modules() if hasattr(m, "attend")]
    x, t, s = inputs(3)
    net(x, t, s)
    for h in hooks:
        h.remove()
    assert len(seen) >= 2  # the 8x8 attention blocks and the middle one
    for name, out in seen:
        assert out.is_contiguous(memory_format=fmt), name


@pytest.mark.parametrize("mode", ["down", "up"])
def test_box_filter_fast_path_equals_the_fir_convolution(mode):
    x = torch.randn(2, 3, 8, 8)
    k = fir_kernel([1, 1])
    torch.testing.assert_close(fir_resample(x, k, mode, box=True), fir_resample(x, k, mode), rtol=0, atol=1e-6)


def test_fir_resampling_keeps_constants_and_halves_or_doubles_the_size():
    k = fir_kernel([1, 3, 3, 1])
    assert k.sum().item() == pytest.approx(1.0)
    ones = torch.ones(1, 2, 8, 8)
    down, up = fir_resample(ones, k, "down"), fir_resample(ones, k, "up")
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))  # away from the zero padding
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.ones(1, 2, 14, 14))


# --- options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,key,match", [
    (dict(channel_mult=[1, 1, 1, 1, 1]), "channel_mult", "image size 8 is not divisible by 2.4 = 16"),
    (dict(channel_mult=[1, 1], attn_resolutions=[16]), "attn_resolutions", r"resolution 16 is not one of .*\[8, 4\]"),
    (dict(channel_mult=[1, 1], model_channels=130), "model_channels", "GroupNorm cannot split 130 channels"),
    (dict(channel_mult=[1, 1], resample_filter=[1, 2, 1]), "resample_filter", "even number of taps"),
])
def test_constraints_between_options_name_the_key(options, key, match):
    with pytest.raises(OptionError, match=match) as exc:
        unet((1, 8, 8), **{**TINY, "attn_resolutions": [], **options})
    assert exc.value.key == key


def test_recipes_get_one_line_errors_naming_the_backbone_key():
    from fewstep.build import build_components

    base = {"data": {"name": "digits", "limit": 16}, "objective": {"name": "fm"}, "train": {"steps": 1}, "eval": {}}
    bad = recipe_from_dict({**base, "backbone": {"name": "unet", "channel_mult": [1, 1, 1, 1, 1]}})
    with pytest.raises(RecipeError, match=r"<dict>: backbone\.channel_mult: unet: image size 8 .*\(backbone 'unet'\)"):
        build_components(bad)
    with pytest.raises(RecipeError, match="resample_filter"):  # per-option checks come first, from the declarations
        recipe_from_dict({**base, "backbone": {"name": "unet", "resample_filter": [-1, 1]}})


def test_registration_declares_the_ect_defaults_and_imports_no_torch():
    spec = Registry().get("backbone", "unet")
    d = spec.options.resolve({})
    assert (d["model_channels"], d["channel_mult"], d["num_blocks"], d["attn_resolutions"]) == (128, [2, 2, 2], 4, [16])
    assert (d["channel_mult_noise"], d["resample_filter"], d["dropout"], d["augment_dim"]) == (1, [1, 1], 0.2, 0)
    assert spec.package == "fewstep" and all(o.help for o in spec.options.options)
    code = "import sys, fewstep_plugins.unet; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- end to end -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["fm", "meanflow"])
def test_a_few_training_steps_on_digits(tmp_path, objective):
    """8x8 grey digits, 10 classes; MeanFlow runs torch.func.jvp through the U-Net (dropout active)."""
    recipe = recipe_from_dict({
        "data": {"name": "digits", "limit": 32},
        "backbone": {"name": "unet", **TINY, "model_channels": 8, "attn_resolutions": [4], "dropout": 0.1},
        "objective": {"name": objective},
        "train": {"steps": 3, "batch": 8, "log_every": 1, "device": "cpu"},
        "eval": {"nfe": [1], "grid": 4},
    })
    res = Trainer(recipe, tmp_path / "run", show_progress=False).run()
    assert res.step == 3 and math.isfinite(res.final_metrics["loss"])
