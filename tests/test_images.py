"""Pixel data: EDM's augmentation, CIFAR-10 in its three forms, class-per-folder trees with ADM's centre crop."""
import io
import math
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import builtin
from fewstep.api import BuildContext, DataError, index_stream
from fewstep_plugins.images import augment as A
from fewstep_plugins.images.cifar10 import CLASSES
from fewstep_plugins.images.crop import adm_center_crop
from fewstep_plugins.images.source import augment_draws, flip_coins

CTX = BuildContext()
SOFLOW = dict(xflip=1e8, yflip=0, scale=1, rotate=0, aniso=1, translate=1)  # SoFlow / py-meanflow CIFAR-10
EDM = dict(xflip=1e8, yflip=1, scale=1, rotate=1, aniso=1, translate=1)  # NVlabs/edm train.py


def draw(n=1, **values):
    """An AugmentDraw with every field zero except `values` (lists or scalars)."""
    fields = A.AugmentDraw.__dataclass_fields__
    return A.AugmentDraw(**{f: torch.as_tensor(values.get(f, [0.0] * n), dtype=torch.float32).reshape(n) for f in fields})


def blob(h=48, w=48, sx=5.0, sy=2.5):
    """A centred Gaussian blob, long along x: (1, 1, h, w)."""
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    return torch.exp(-(xx ** 2 / (2 * sx ** 2) + yy ** 2 / (2 * sy ** 2)))[None, None].double().float(), xx, yy


def moments(img, xx, yy):
    m = img[0, 0].double()
    s = m.sum()
    mx, my = (m * xx).sum() / s, (m * yy).sum() / s
    cov = torch.tensor([[(m * (xx - mx) ** 2).sum(), (m * (xx - mx) * (yy - my)).sum()],
                        [(m * (xx - mx) * (yy - my)).sum(), (m * (yy - my) ** 2).sum()]]) / s
    return torch.stack([mx, my]), cov


# -- the augmentation pipeline ------------------------------------------------------------------------------------

def test_sym6_is_an_orthonormal_filter_so_up_then_down_is_the_identity():
    h = torch.tensor(A.SYM6, dtype=torch.float64)
    assert abs(h.sum().item() - math.sqrt(2)) < 1e-12 and abs((h * h).sum().item() - 1) < 1e-12
    for j in range(1, 6):
        assert abs((h[2 * j:] * h[:-2 * j]).sum().item()) < 1e-12
    x = torch.randn(2, 3, 20, 24, dtype=torch.float64)
    y = A._down2(A._up2(x))
    assert y.shape == x.shape
    assert torch.allclose(y[..., 4:-4, 4:-4], x[..., 4:-4, 4:-4], atol=1e-12)  # exact away from the zero borders
    assert torch.allclose(A.warp(x.float(), torch.eye(2).repeat(2, 1, 1), torch.zeros(2, 2)), x.float(), atol=1e-5)


def test_label_layout_and_dimension_match_the_official_pipelines():
    soflow, edm = A.AugmentPipe(p=0.12, **SOFLOW), A.AugmentPipe(p=0.12, **EDM)
    assert soflow.dim == 6 and edm.dim == 9  # SoFlow's / py-meanflow's U-Net augment_dim 6, EDM's 9
    assert soflow.label_names() == ["xflip", "scale", "aniso_w_cos_r", "aniso_w_sin_r", "translate_x", "translate_y"]
    assert edm.label_names() == ["xflip", "yflip", "scale", "rotate_cos_minus_1", "rotate_sin", "aniso_w_cos_r",
                                 "aniso_w_sin_r", "translate_x", "translate_y"]
    d = draw(1, xflip=1, yflip=1, scale=0.5, rotate=0.3, aniso=-0.7, aniso_angle=1.1, tx=0.2, ty=-0.4)
    want = [1, 1, 0.5, math.cos(0.3) - 1, math.sin(0.3), -0.7 * math.cos(1.1), -0.7 * math.sin(1.1), 0.2, -0.4]
    assert torch.allclose(edm.labels(d)[0], torch.tensor(want), atol=1e-6)
    assert torch.allclose(soflow.labels(d)[0], torch.tensor([want[0], want[2], *want[5:]]), atol=1e-6)


def test_zero_probability_is_the_identity_with_zero_labels():
    x = torch.randn(16, 3, 8, 8)
    out, labels = A.AugmentPipe(p=0.0, **EDM)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and labels.shape == (16, 9) and not labels.any()


def test_xflip_label_one_means_exactly_mirrored_and_the_official_1e8_flips_half_whatever_p():
    x = torch.randn(4000, 1, 4, 5)
    pipe = A.AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=0, rotate=0, aniso=0, translate=0)
    out, labels = pipe(x, torch.Generator().manual_seed(1))
    flipped = labels[:, 0] == 1
    assert labels.shape == (4000, 1) and set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # min(1, 1e8 * 0.12) * 1/2
    pipe.multipliers["xflip"] = 1.0  # a plain multiplier: applied with chance p, then a coin
    assert abs(pipe(x, torch.Generator().manual_seed(1))[1].mean().item() - 0.06) < 0.015


def test_yflip_label_one_means_exactly_upside_down():
    x = torch.randn(64, 3, 6, 6)
    out, labels = A.AugmentPipe(p=1.0, xflip=0, yflip=1, scale=0, rotate=0, aniso=0, translate=0)(
        x, torch.Generator().manual_seed(2))
    up = labels[:, 0] == 1
    assert 0 < up.sum() < 64 and torch.equal(out[up], x[up].flip(2)) and torch.equal(out[~up], x[~up])


def test_an_integer_translation_label_shifts_the_image_exactly():
    x = torch.randn(1, 2, 32, 32)
    pipe = A.AugmentPipe(p=1.0, **EDM)
    # tx = 0.5 -> 0.5 * 0.125 * 32 = 2 pixels right, ty = -0.25 -> 1 pixel up
    out = pipe.apply(x, draw(tx=0.5, ty=-0.25))
    assert torch.allclose(out[..., 8:-8, 8:-8], x[..., 9:-7, 6:-10], atol=1e-5)


@pytest.mark.parametrize("values", [dict(scale=1.3), dict(rotate=0.8), dict(rotate=-2.5), dict(aniso=1.5, aniso_angle=0.6),
                                    dict(scale=-0.7, rotate=1.9, aniso=-1.2, aniso_angle=-2.2, tx=0.3, ty=0.2)])
def test_geometric_transforms_move_a_blob_as_their_matrices_say(values):
    """Output pixel p shows input point A (p - t): a Gaussian blob's moments become those of the blob drawn at
    A (p - t) in closed form (up to a sub-pixel offset of the filters that the official pipeline has too). Only
    the central disk counts: the corners show the reflect padding's mirror images, as in the official code."""
    img, xx, yy = blob()
    d = draw(**values)
    out = A.AugmentPipe(p=1.0, **EDM).apply(img, d)
    Ainv, t = A.inverse_affine(d, 48, 48)
    a, t = Ainv[0].double(), t[0].double()
    qx, qy = a[0, 0] * (xx - t[0]) + a[0, 1] * (yy - t[1]), a[1, 0] * (xx - t[0]) + a[1, 1] * (yy - t[1])
    closed = torch.exp(-(qx ** 2 / 50 + qy ** 2 / 12.5))[None, None]
    disk = (xx ** 2 + yy ** 2 < 21 ** 2).double()[None, None]
    mean, cov = moments(out.double() * disk, xx, yy)
    want_mean, want_cov = moments(closed * disk, xx, yy)
    assert torch.allclose(cov, want_cov, rtol=0.01, atol=0.05) and torch.allclose(mean, want_mean, atol=0.15)
    assert (out.double() * disk - closed * disk).abs().max() < 0.05
    s = 2 ** (0.2 * values.get("scale", 0.0))  # the scale label w means a factor 2 ** (0.2 w)
    assert abs(1 / torch.linalg.det(a).item() - s * s) < 1e-5


def test_matches_the_official_pipeline_on_the_same_draws():
    """Numbers produced once by NVlabs/edm training/augment.py (as copied into zlab-princeton/SoFlow) with
    AugmentPipe(p=0.9, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) under
    torch.manual_seed(11), whose draws are the ones below."""
    n = 4
    d = draw(n, xflip=[1, 1, 0, 1], yflip=[1, 1, 0, 0], scale=[0.450417787, -0.956833422, 1.50118792, -0.313573658],
             rotate=[-1.49430561, 0.817258596, 2.37195206, -2.11980867],
             aniso=[0.892881513, -0.489056051, -1.44702077, 1.1940695],
             aniso_angle=[-1.73497009, 0.401449829, 0.706815004, 0.0],
             tx=[1.38957608, 0.172807246, -0.983503997, -1.09371018], ty=[0.131824404, 0.19427824, -0.338993371, 1.65940607])
    yy, xx = torch.meshgrid(torch.arange(16) - 7.5, torch.arange(16) - 7.5, indexing="ij")
    img = torch.stack([torch.exp(-(xx ** 2 / 18 + (yy - 1) ** 2 / 8)), (xx + 2 * yy) / 24,
                       torch.cos(xx / 3) * torch.sin(yy / 4)])[None].repeat(n, 1, 1, 1)
    pipe = A.AugmentPipe(p=0.9, **EDM)
    out = pipe.apply(img, d)
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.tensor([-22.043508529663086, 48.69962692260742,
                                                                62.680259704589844, 62.52826690673828]), atol=1e-3)
    assert torch.allclose(out[:, :, 5, 9], torch.tensor([
        [0.3910169303417206, 0.005083133466541767, -0.1965625286102295],
        [0.5332120656967163, -0.0524960532784462, 0.11373981088399887],
        [0.3856675922870636, 0.26329466700553894, 0.7461003065109253],
        [0.05345224216580391, 0.37373998761177063, -0.16175325214862823]]), atol=1e-5)
    assert torch.allclose(out[:, 0, 10, 3], torch.tensor([0.00018131322576664388, 0.10393565148115158,
                                                          0.041269779205322266, 0.8306744694709778]), atol=1e-5)
    assert torch.allclose(pipe.labels(d)[0], torch.tensor([1.0, 1.0, 0.45041778683662415, -0.9235838651657104,
                                                           -0.9970760345458984, -0.14593011140823364, -0.8808755874633789,
                                                           1.3895760774612427, 0.13182440400123596]), atol=1e-6)


def test_draws_follow_the_official_distributions():
    d = A.AugmentPipe(p=0.5, **EDM).draw(20000, torch.Generator().manual_seed(3))
    hit = d.scale != 0
    assert abs(hit.float().mean() - 0.5) < 0.02 and abs(d.scale[hit].std() - 1) < 0.03  # w ~ N(0, 1) with chance p
    assert abs((d.rotate != 0).float().mean() - 0.5) < 0.02 and d.rotate.abs().max() <= math.pi
    assert abs((d.aniso_angle != 0).float().mean() - 0.5) < 0.02  # the axis is rotated half the time
    moved = (d.tx != 0) | (d.ty != 0)
    assert torch.equal(moved, (d.tx != 0) & (d.ty != 0))  # one decision for both axes


# -- CIFAR-10 in its three forms ----------------------------------------------------------------------------------

def fake_cifar(n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    x = {"train": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
         "test": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)}
    y = {"train": np.arange(n_train) % 10, "test": (np.arange(n_test) * 3) % 10}
    return x, y


def write_python_batches(folder, x, y):
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(y["train"])), 5)
    for i, rows in enumerate(chunks, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x["train"][rows].reshape(len(rows), -1), "labels": y["train"][rows].tolist(),
                         "batch_label": f"batch {i}"}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x["test"].reshape(len(y["test"]), -1), "labels": y["test"].tolist()}, f, protocol=2)


def write_png_tree(folder, x, y, split):
    for i, (img, label) in enumerate(zip(x[split], y[split])):
        d = folder / split / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:04d}.png")


def cifar(root, **kw):
    return builtin("dataset", "cifar10")(CTX, root=str(root), **{"cache_dir": "", **kw})


def sorted_by_tree(x, y):
    """The order a class-per-folder tree is read in: by class, then file name (the index)."""
    order = sorted(range(len(y)), key=lambda i: (CLASSES[y[i]], i))
    return torch.from_numpy(x[order]), torch.from_numpy(y[order])


@pytest.mark.parametrize("form", ["python", "python-archive", "folder", "tar"])
def test_cifar10_reads_every_form_pixel_exactly(tmp_path, form):
    x, y = fake_cifar()
    root = tmp_path / "c"
    if form == "python":
        write_python_batches(root / "cifar-10-batches-py", x, y)
    elif form == "python-archive":
        write_python_batches(tmp_path / "src" / "cifar-10-batches-py", x, y)
        root.mkdir()
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tf:
            tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    else:
        write_png_tree(tmp_path / "tree", x, y, "train")
        write_png_tree(tmp_path / "tree", x, y, "test")
        if form == "folder":
            root = tmp_path / "tree"
        else:
            root.mkdir()
            for split in ("train", "test"):
                with tarfile.open(root / f"{split}.tar.gz", "w:gz") as tf:
                    tf.add(tmp_path / "tree" / split, arcname=split)
    data = cifar(root, conditional=True)
    want_x, want_y = (torch.from_numpy(x["train"]), torch.from_numpy(y["train"])) if form.startswith("python") else \
        sorted_by_tree(x["train"], y["train"])
    assert torch.equal(data.images, want_x) and torch.equal(data.labels, want_y)
    assert data.spec.shape == (3, 32, 32) and data.spec.num_classes == 10
    test = data.reference_images("test")
    want_test = torch.from_numpy(x["test"]) if form.startswith("python") else sorted_by_tree(x["test"], y["test"])[0]
    assert sorted(map(tuple, (test.flatten(1) * 127.5 + 127.5).round().tolist())) == \
        sorted(map(tuple, want_test.flatten(1).float().tolist()))  # every test image once, in [-1, 1]


def test_cifar10_batches_are_the_index_stream_scaled_to_unit_range(tmp_path):
    x, y = fake_cifar()
    write_python_batches(tmp_path / "cifar-10-batches-py", x, y)
    data = cifar(tmp_path)
    b = next(data.batches(8, seed=4))
    idx = next(index_stream(30, 8, 4))
    assert torch.equal(b.x, torch.from_numpy(x["train"][idx.numpy()]).float() / 127.5 - 1)
    assert b.y is None and b.cond == {} and data.spec.num_classes == 0  # unconditional by default, as the official runs


def test_a_pickle_that_is_not_a_cifar_batch_is_refused(tmp_path):
    x, y = fake_cifar()
    write_python_batches(tmp_path / "cifar-10-batches-py", x, y)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR-10 python batch.*refusing to load posix.system"):
        cifar(tmp_path)


def test_cifar10_caches_the_decoded_split_and_notices_a_changed_source(tmp_path, monkeypatch):
    x, y = fake_cifar()
    write_png_tree(tmp_path, x, y, "train")
    with tarfile.open(tmp_path / "train.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "train", arcname="train")
    root = tmp_path / "r"
    root.mkdir()
    os.replace(tmp_path / "train.tar.gz", root / "train.tar.gz")
    first = cifar(root, cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "cifar10").glob("train-*.safetensors"))) == 1
    import fewstep_plugins.images.cifar10 as C

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(C, "decode_split", no_decoding)
    again = cifar(root, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    os.utime(root / "train.tar.gz", ns=(1, 1))  # a different archive (mtime): the cache no longer applies
    with pytest.raises(AssertionError, match="decoded again"):
        cifar(root, cache_dir=str(tmp_path / "cache"))


def test_cifar10_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"holds no train split.*download = true"):
        cifar(tmp_path)
    x, y = fake_cifar()
    write_png_tree(tmp_path / "a", x, y, "train")
    os.rename(tmp_path / "a" / "train" / "cat", tmp_path / "a" / "train" / "kitten")
    with pytest.raises(DataError, match=r"class folders .*kitten.*CIFAR-10 needs exactly"):
        cifar(tmp_path / "a")
    write_png_tree(tmp_path / "b", x, y, "train")
    (tmp_path / "b" / "train" / "dog" / "0005.png").write_bytes(b"not a png")
    Image.new("RGB", (33, 32)).save(tmp_path / "b" / "train" / "dog" / "0015.png")
    with pytest.raises(DataError, match=r"1 unreadable image\(s\): .*train/dog/0005.png.*bad_images = \"skip\""):
        cifar(tmp_path / "b")
    with pytest.warns(UserWarning, match="skipped 2"):
        data = cifar(tmp_path / "b", bad_images="skip", conditional=True)
    assert len(data) == 28 and (data.labels == CLASSES.index("dog")).sum() == 1


def test_flip_mirrors_the_rows_its_coins_say(tmp_path):
    x, y = fake_cifar()
    write_python_batches(tmp_path / "cifar-10-batches-py", x, y)
    plain, flipped = cifar(tmp_path), cifar(tmp_path, flip=True)
    for step, (a, b) in enumerate(zip(plain.batches(10, seed=1), flipped.batches(10, seed=1))):
        coins = flip_coins(1, step, 10)
        assert torch.equal(b.x[coins], a.x[coins].flip(3)) and torch.equal(b.x[~coins], a.x[~coins])
        if step == 3:
            break


def test_augmented_batches_are_deterministic_resumable_and_world_size_independent(tmp_path):
    x, y = fake_cifar()
    write_python_batches(tmp_path / "cifar-10-batches-py", x, y)
    data = cifar(tmp_path, augment=0.5, **{f"augment_{k}": v for k, v in EDM.items()}, flip=True)
    assert data.augment_dim == 9
    stream = data.batches(8, seed=2)
    full = [next(stream) for _ in range(4)]
    resumed = next(data.batches(8, seed=2, start_step=3))
    assert torch.equal(resumed.x, full[3].x) and torch.equal(resumed.cond["augment_labels"], full[3].cond["augment_labels"])
    labels = full[3].cond["augment_labels"]
    assert labels.shape == (8, 9) and (labels != 0).any()
    halves = [next(data.batches(4, seed=2, start_step=3, rank=r, world=2)) for r in range(2)]
    assert torch.allclose(torch.cat([h.x for h in halves]), full[3].x, atol=1e-5)
    assert torch.equal(torch.cat([h.cond["augment_labels"] for h in halves]), labels)
    d = augment_draws(data.pipe, 2, 3, 8)
    assert torch.equal(data.pipe.labels(d), labels)  # the draws of step 3 depend on (seed, step) only


def test_reference_batches_are_rank_sharded_plain_images(tmp_path):
    x, y = fake_cifar()
    write_python_batches(tmp_path / "cifar-10-batches-py", x, y)
    data = cifar(tmp_path, flip=True, augment=0.12)
    whole = list(data.reference_batches("train", batch_size=4, limit=22))
    assert [len(b) for b in whole] == [4, 4, 4, 4, 4, 2]
    shards = [list(data.reference_batches("train", batch_size=4, limit=22, rank=r, world=3)) for r in range(3)]
    assert all(torch.equal(shards[k % 3][k // 3], whole[k]) for k in range(6))
    got = torch.cat(whole)
    pixels = set(map(tuple, ((got.flatten(1) + 1) * 127.5).round().int().tolist()))
    assert pixels <= set(map(tuple, x["train"].reshape(30, -1).astype(int).tolist()))  # no flip, no augmentation
    with pytest.raises(DataError, match="no split 'val'"):
        next(data.reference_batches("val"))


def test_trains_a_few_steps_on_cifar10(tmp_path, tiny):
    x, y = fake_cifar()
    write_python_batches(tmp_path / "cifar-10-batches-py", x, y)
    from fewstep.api import Trainer

    r = tiny(data={"name": "cifar10", "root": str(tmp_path), "cache_dir": "", "conditional": True},
             backbone={"size": "T/8"}, train={"steps": 2, "batch": 4}, eval={"grid": 2})
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert res.step == 2 and math.isfinite(res.final_metrics["loss"])


# -- class-per-folder trees and ADM's centre crop -----------------------------------------------------------------

def test_adm_crop_halves_with_a_box_filter_then_cuts_the_centre():
    blocks = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)  # 4x4-pixel blocks below
    img = Image.fromarray(np.repeat(np.repeat(blocks, 4, 0), 4, 1))  # 512 x 256: halved twice (256 >= 2 * 64, 128 >= 128)
    out = adm_center_crop(img, 64)
    assert out.shape == (64, 64, 3) and np.array_equal(out, blocks[:, 32:96])  # the centred 64 of 128 columns


def test_adm_crop_resizes_the_short_side_and_leaves_the_odd_pixel_right():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 47, 3), dtype=np.uint8))
    out = adm_center_crop(img, 30)  # short side already 30: the bicubic resize keeps the size, crop (47 - 30) // 2 = 8
    assert np.array_equal(out, np.asarray(img)[:, 8:38])
    small = adm_center_crop(Image.new("RGB", (10, 20), (200, 10, 30)), 16)  # enlarged: 16 x 32, centre 16 rows
    assert small.shape == (16, 16, 3) and (small == [200, 10, 30]).all()


def make_tree(root, sizes, seed=0):
    """root/<class>/<i>.png with the given (w, h) per class; returns the arrays by (class, name)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for cls, dims in sizes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(dims):
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"{i}.png")
            arrays[(cls, i)] = a
    return arrays


def folder(root, **kw):
    return builtin("dataset", "imagefolder")(CTX, root=str(root), **{"resolution": 16, "workers": 0, "cache_dir": "", **kw})


def test_imagefolder_batches_are_cropped_images_in_index_stream_order(tmp_path):
    arrays = make_tree(tmp_path, {"cat": [(20, 16), (16, 24), (16, 16)], "dog": [(40, 32), (17, 16)]})
    data = folder(tmp_path)
    assert data.spec.shape == (3, 16, 16) and data.spec.num_classes == 2 and len(data) == 5
    keys = [("cat", 0), ("cat", 1), ("cat", 2), ("dog", 0), ("dog", 1)]
    stream = data.batches(3, seed=7)
    for step, idx in zip(range(3), index_stream(5, 3, 7)):
        b = next(stream)
        want = [adm_center_crop(Image.fromarray(arrays[keys[i]]), 16) for i in idx.tolist()]
        assert torch.equal(b.x, torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2).float() / 127.5 - 1)
        assert b.y.tolist() == [0 if keys[i][0] == "cat" else 1 for i in idx.tolist()]
    halves = [next(data.batches(2, seed=7, start_step=2, rank=r, world=2)) for r in range(2)]
    whole = next(data.batches(4, seed=7, start_step=2))
    assert torch.equal(torch.cat([h.x for h in halves]), whole.x)


def test_imagefolder_workers_give_the_same_stream(tmp_path):
    make_tree(tmp_path, {"a": [(16, 16)] * 6, "b": [(18, 16)] * 5})
    inline = folder(tmp_path, flip=True)
    workers = folder(tmp_path, flip=True, workers=2, prefetch=1)
    for a, b, _ in zip(inline.batches(4, seed=1, start_step=5), workers.batches(4, seed=1, start_step=5), range(4)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_imagefolder_bad_input_is_named_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in .*empty: it has no class folders"):
        folder(tmp_path / "empty")
    make_tree(tmp_path / "loose", {"x": [(16, 16)]})
    os.replace(tmp_path / "loose" / "x" / "0.png", tmp_path / "loose" / "0.png")
    os.rmdir(tmp_path / "loose" / "x")
    with pytest.raises(DataError, match="holds images but no class folders"):
        folder(tmp_path / "loose")
    (tmp_path / "txt" / "a").mkdir(parents=True)
    (tmp_path / "txt" / "a" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images in .*txt .*class folders"):
        folder(tmp_path / "txt")
    make_tree(tmp_path / "t", {"a": [(16, 16), (12, 20), (16, 16)], "b": [(16, 16)]})
    (tmp_path / "t" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"1 unreadable image\(s\): .*b/broken.jpg"):
        folder(tmp_path / "t")
    with pytest.raises(DataError, match=r"1 image\(s\) in .* smaller than the 16px crop: a/1.png \(12x20\).*upscale"):
        folder(tmp_path / "t", bad_images="skip")
    with pytest.warns(UserWarning, match="left out 2 of 5"):
        assert len(folder(tmp_path / "t", bad_images="skip", small_images="skip")) == 3
    with pytest.warns(UserWarning, match="left out 1 of 5"):
        up = folder(tmp_path / "t", bad_images="skip", small_images="upscale")
    assert len(up) == 4 and next(up.batches(4, seed=0)).x.shape == (4, 3, 16, 16)


def test_imagefolder_scan_is_cached(tmp_path, monkeypatch):
    make_tree(tmp_path / "d", {"a": [(16, 16), (20, 16)], "b": [(16, 30)]})
    first = folder(tmp_path / "d", cache_dir=str(tmp_path / "cache"))
    import fewstep_plugins.images.imagefolder as F

    monkeypatch.setattr(F._Headers, "__getitem__", lambda self, i: (_ for _ in ()).throw(AssertionError("rescanned")))
    again = folder(tmp_path / "d", cache_dir=str(tmp_path / "cache"))
    assert again.scan.files == first.scan.files == ["a/0.png", "a/1.png", "b/0.png"]
    Image.new("RGB", (16, 16)).save(tmp_path / "d" / "b" / "1.png")  # a new file: the listing changed
    with pytest.raises(AssertionError, match="rescanned"):
        folder(tmp_path / "d", cache_dir=str(tmp_path / "cache"))


def test_imagefolder_reference_batches(tmp_path):
    arrays = make_tree(tmp_path, {"a": [(16, 16)] * 4, "b": [(16, 16)] * 3})
    data = folder(tmp_path, flip=True)
    shards = [list(data.reference_batches("train", batch_size=2, limit=5, rank=r, world=2)) for r in range(2)]
    assert [len(b) for b in shards[0]] == [2, 1] and [len(b) for b in shards[1]] == [2]
    got = torch.cat([shards[0][0], shards[1][0], shards[0][1]])
    real = {tuple(a.transpose(2, 0, 1).reshape(-1).tolist()) for a in arrays.values()}
    assert all(tuple(((g + 1) * 127.5).round().int().reshape(-1).tolist()) in real for g in got)  # unflipped originals
    assert len({tuple(g.reshape(-1).tolist()) for g in got}) == 5
    with pytest.raises(DataError, match="one split"):
        next(data.reference_batches("test"))
