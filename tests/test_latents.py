"""VAE latents: `fewstep cache-latents` (layout, posterior, resume after a kill) and the `latents` data source
(per-step posterior draws, scaling, decoding, mismatch errors), with randomly initialised AutoencoderKLs."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import builtin
from fewstep.api import BuildContext, DataError, index_stream
from fewstep_plugins.images.crop import adm_center_crop
from fewstep_plugins.images.files import step_generator
from fewstep_plugins.latents import cache as C
from fewstep_plugins.latents import vae as V

# the sd-vae-ft-mse structure (four blocks: downsampling 8), narrow enough for CPU tests
TINY = dict(V.SD_VAE_CONFIG, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)
RES = 32


def save_vae(path, seed):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**TINY).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images root/<class>/<i>.png of several sizes, two tiny VAEs (and a copy of the first), one finished cache."""
    base = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    images = base / "images"
    sizes = {"cat": [(40, 32), (32, 48), (64, 64), (33, 32)], "dog": [(32, 32), (70, 40), (36, 36)]}
    for cls, dims in sizes.items():
        (images / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(dims):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    vae = save_vae(base / "vae", 0)
    other = save_vae(base / "vae-other", 1)
    copy = save_vae(base / "vae-copy", 0)  # the same weights under another name
    out = base / "cache"
    run_cache(images, out, vae)
    return dict(base=base, images=images, vae=vae, other=other, copy=copy, out=out)


def run_cache(images, out, vae, **kw):
    args = dict(source=str(images), out=out, resolution=RES, vae=vae, batch=2, workers=0, shard_size=3,
                small_images="error", bad_images="error", check="header", dtype="fp32", device="cpu",
                cache_dir="", show_progress=False)
    return C.cache_latents(**{**args, **kw})


def latents(world, **kw):
    return builtin("dataset", "latents")(BuildContext(), root=str(world["out"]), **{"vae": world["vae"],
                                                                                   "resolution": RES, "workers": 0, **kw})


def crops(world):
    files = (world["out"] / C.FILES).read_text().splitlines()
    arr = np.stack([adm_center_crop(Image.open(world["images"] / f).convert("RGB"), RES) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_cache_layout_and_metadata(world):
    out = world["out"]
    meta = json.loads((out / C.META).read_text())
    assert meta["complete"] and meta["num_images"] == 7 and meta["num_shards"] == 3 and meta["shard_size"] == 3
    assert meta["resolution"] == RES and meta["crop"] == "adm-center" and meta["flip"] is False
    assert meta["latent_shape"] == [4, RES // 8, RES // 8] and meta["classes"] == ["cat", "dog"]
    assert meta["vae"] == world["vae"] and meta["vae_fingerprint"] == V.fingerprint(V.load_vae(world["vae"])[0])
    assert (out / C.FILES).read_text().splitlines() == ["cat/0.png", "cat/1.png", "cat/2.png", "cat/3.png",
                                                       "dog/0.png", "dog/1.png", "dog/2.png"]
    assert np.load(out / C.LABELS, allow_pickle=False).tolist() == [0, 0, 0, 0, 1, 1, 1]
    shards = [np.load(C.shard_paths(out, k)[0], allow_pickle=False) for k in range(3)]
    assert [s.shape for s in shards] == [(3, 2, 4, 4, 4), (3, 2, 4, 4, 4), (1, 2, 4, 4, 4)]
    assert all(s.dtype == np.float16 for s in shards)


def test_the_cache_holds_the_posterior_mean_and_std_of_the_cropped_images(world):
    vae, _ = V.load_vae(world["vae"])
    mean, std = V.encode(vae, crops(world))
    z = torch.from_numpy(np.concatenate([np.load(C.shard_paths(world["out"], k)[0]) for k in range(3)])).float()
    assert torch.allclose(z[:, 0], mean, rtol=1e-3, atol=1e-3) and torch.allclose(z[:, 1], std, rtol=1e-3, atol=1e-4)
    dist = vae.encode(crops(world)).latent_dist  # the std really is exp(logvar / 2) of diffusers' posterior
    assert torch.allclose(std, torch.exp(0.5 * dist.logvar), rtol=1e-5)


def test_every_step_draws_a_fresh_latent_from_the_posterior(world):
    data = latents(world)
    assert data.spec.shape == (4, 4, 4) and data.spec.num_classes == 2
    stream = data.batches(4, seed=3)
    eps_all = []
    for step, idx in zip(range(40), index_stream(7, 4, 3)):
        b = next(stream)
        mean, std = data.posterior(data.rows[idx])
        eps = (b.x / 0.18215 - mean) / std
        want = torch.stack([torch.randn(4, 4, 4, generator=step_generator(3, step, f"latent/{j}")) for j in range(4)])
        assert torch.allclose(eps, want, atol=1e-3)  # x = (mean + std * eps) * 0.18215, eps keyed by (seed, step, row)
        assert b.y.tolist() == data.labels[idx].tolist()
        eps_all.append(eps)
    e = torch.cat(eps_all)
    assert abs(e.mean()) < 0.03 and abs(e.std() - 1) < 0.03 and not torch.allclose(eps_all[0], eps_all[2])
    resumed = next(data.batches(4, seed=3, start_step=39))
    assert torch.equal(resumed.x, b.x)
    halves = [next(data.batches(2, seed=3, start_step=39, rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat([h.x for h in halves]), b.x)  # the global batch does not depend on the world size


def test_scaling_factor_and_decoding(world):
    data, half = latents(world), latents(world, scaling_factor=0.5)
    a, b = next(data.batches(3, seed=0)), next(half.batches(3, seed=0))
    assert torch.allclose(a.x / 0.18215, b.x / 0.5, atol=1e-5)
    vae, _ = V.load_vae(world["vae"])
    with torch.no_grad():
        want = vae.decode(a.x / 0.18215).sample.clamp(-1, 1)
    images = data.to_images(a.x)
    assert images.shape == (3, 3, RES, RES) and torch.allclose(images, want, atol=1e-5)
    assert torch.allclose(latents(world, decode_batch=1).to_images(a.x), want, atol=1e-5)


def test_per_channel_standardisation_and_its_inverse(world):
    """iMF's latents: (sample - mean_c) / std_c per channel (Lyy-iiis/imeanflow utils/vae_util.py), decoded exactly."""
    mean, std = [0.86488, -0.27787343, 0.21616915, 0.3738409], [4.85503674, 5.31922414, 3.93725398, 3.9870003]
    data, std_data = latents(world), latents(world, channel_mean=mean, channel_std=std)
    a, b = next(data.batches(3, seed=0)), next(std_data.batches(3, seed=0))
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    assert torch.allclose(b.x, (a.x / 0.18215 - m) / s, atol=1e-5)
    assert torch.allclose(std_data.decode_space(b.x), a.x / 0.18215, atol=1e-5)
    assert torch.allclose(std_data.to_images(b.x), data.to_images(a.x), atol=1e-4)
    from fewstep.api import OptionError

    with pytest.raises(OptionError, match="channel_std"):
        latents(world, channel_mean=mean, channel_std=std[:2])
    with pytest.raises(OptionError, match="4 channels"):
        latents(world, channel_mean=mean[:2], channel_std=std[:2])


def test_the_cache_must_match_the_recipe(world, tmp_path):
    with pytest.raises(DataError, match=r"holds 32px latents but data.resolution = 64"):
        latents(world, resolution=64)
    with pytest.raises(DataError, match=r"encoded with the VAE .*vae'.* has other weights"):
        latents(world, vae=world["other"])
    assert latents(world, vae=world["copy"]).spec.shape == (4, 4, 4)  # another name, the same weights: fine
    with pytest.raises(DataError, match=r"is not a latent cache \(no meta.json\).*cache-latents"):
        builtin("dataset", "latents")(BuildContext(), root=str(tmp_path))
    with pytest.raises(DataError, match=r"holds latents made with other settings \(resolution: 32 .*!= 64"):
        run_cache(world["images"], world["out"], world["vae"], resolution=64, small_images="upscale")
    with pytest.raises(DataError, match=r"VAE .*nowhere.*no such folder"):
        run_cache(world["images"], tmp_path / "x", str(tmp_path / "nowhere"))


def test_a_killed_cache_run_resumes_where_it_stopped(world, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real, calls = C.write_shard, []

    def killed_after_one(out_, k, buf, invalid):
        if calls:
            (out_ / C.SHARDS / f".{k:05d}.npy.4242.tmp.npy").write_bytes(b"half a shard")  # what a kill leaves
            raise KeyboardInterrupt
        calls.append(k)
        real(out_, k, buf, invalid)

    monkeypatch.setattr(C, "write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_cache(world["images"], out, world["vae"])
    monkeypatch.setattr(C, "write_shard", real)
    assert calls == [0] and not json.loads((out / C.META).read_text())["complete"]
    with pytest.raises(DataError, match=r"unfinished cache \(1 of 3 shards\); run the same"):
        builtin("dataset", "latents")(BuildContext(), root=str(out), vae=world["vae"], resolution=RES)
    first = C.shard_paths(out, 0)[0].stat().st_mtime_ns
    res = run_cache(world["images"], out, world["vae"])
    assert res.complete and res.encoded_here == 4  # shard 0 (3 images) was kept, shards 1 and 2 were encoded
    assert C.shard_paths(out, 0)[0].stat().st_mtime_ns == first and not list((out / C.SHARDS).glob(".*"))
    for k in range(3):
        assert np.array_equal(np.load(C.shard_paths(out, k)[0]), np.load(C.shard_paths(world["out"], k)[0]))
    assert json.loads((out / C.META).read_text())["complete"]


def test_unreadable_images_stop_the_cache_or_are_left_out(world, tmp_path):
    images = tmp_path / "imgs"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 40 * i + 10, np.uint8)).save(images / cls / f"{i}.png")
    data = (images / "b" / "1.png").read_bytes()
    (images / "b" / "1.png").write_bytes(data[:len(data) // 2])  # header intact, pixels cut off
    with pytest.raises(DataError, match=r"cannot read .*b/1.png") as exc:
        run_cache(images, tmp_path / "c1", world["vae"])
    assert "\n" not in str(exc.value) and "Traceback" not in str(exc.value)
    run_cache(images, tmp_path / "c2", world["vae"], bad_images="skip")
    assert json.loads(C.shard_paths(tmp_path / "c2", 1)[1].read_text())["invalid"] == [3]
    data = builtin("dataset", "latents")(BuildContext(), root=str(tmp_path / "c2"), vae=world["vae"], resolution=RES)
    assert len(data) == 3 and data.rows.tolist() == [0, 1, 2]


def test_reference_batches_are_the_source_images_cropped(world):
    data = latents(world)
    refs = torch.cat(list(data.reference_batches("train", batch_size=3)))
    want = crops(world)
    assert refs.shape == (7, 3, RES, RES)
    assert sorted(map(tuple, refs.flatten(1).tolist())) == sorted(map(tuple, want.flatten(1).tolist()))
    shards = [list(data.reference_batches("train", batch_size=3, limit=6, rank=r, world=2)) for r in range(2)]
    assert [len(b) for b in shards[0]] == [3] and [len(b) for b in shards[1]] == [3]
    with pytest.raises(DataError, match="one split"):
        next(data.reference_batches("test"))


def test_cache_latents_command(world, tmp_path):
    import typer
    from typer.testing import CliRunner

    import fewstep_plugins.latents as plugin

    app = typer.Typer()
    plugin.register_commands(app)
    app.command("noop")(lambda: None)  # two commands: Typer keeps the sub-command name
    args = ["cache-latents", "--data", f"imagefolder:{world['images']}", "--out", str(tmp_path / "c"), "--resolution",
            str(RES), "--vae", world["vae"], "--workers", "0", "--device", "cpu", "--cache-dir", "", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "7" in res.output and "KiB per image" in res.output and "complete" in res.output
    (tmp_path / "empty").mkdir()
    bad = CliRunner().invoke(app, [*args[:2], f"imagefolder:{tmp_path / 'empty'}", *args[3:]])
    assert bad.exit_code == 2 and "no images in" in bad.output and "Traceback" not in bad.output
    small = CliRunner().invoke(app, [*args[:5], "--resolution", "64", *args[7:]])
    assert small.exit_code == 2 and "smaller than the 64px crop" in small.output and "--small-images upscale" in small.output


def test_the_real_sd_vae_config_has_83_65m_parameters_and_downsamples_by_8():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**V.SD_VAE_CONFIG).eval()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert V.downsampling(vae) == 8 and vae.config.scaling_factor == V.DEFAULT_SCALING
    mean, std = V.encode(vae, torch.zeros(1, 3, 16, 16))
    assert mean.shape == std.shape == (1, 4, 2, 2) and (std > 0).all()


def test_registration_and_the_command_help_import_no_torch():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, typer
        from typer.testing import CliRunner
        import fewstep_plugins.images, fewstep_plugins.latents
        app = typer.Typer()
        fewstep_plugins.latents.register_commands(app)
        app.command("noop")(lambda: None)
        r = CliRunner().invoke(app, ["cache-latents", "--help"])
        assert r.exit_code == 0 and "--shard-size" in r.output, r.output
        heavy = [m for m in ("torch", "diffusers", "numpy", "PIL") if m in sys.modules]
        assert not heavy, heavy
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


def test_trains_a_few_steps_on_latents_and_decodes_the_grid(world, tmp_path):
    from conftest import tiny_dict
    from fewstep.api import Trainer, recipe_from_dict

    d = tiny_dict(train={"steps": 2, "batch": 4}, eval={"grid": 4})
    d["data"] = {"name": "latents", "root": str(world["out"]), "vae": world["vae"], "resolution": RES, "workers": 0}
    r = recipe_from_dict(d)
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert res.step == 2 and math.isfinite(res.final_metrics["loss"])
    from fewstep.images import caption_band_height

    band = caption_band_height("caption", ["a class per column"])  # labelled data: caption and class names above
    assert Image.open(res.grids[-1]).size == (2 * RES + 6, 2 * RES + 6 + band)  # 2 x 2 decoded 32 px, 2 px padding
