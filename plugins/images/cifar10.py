"""The `cifar10` data source: CIFAR-10 (Krizhevsky 2009), 32x32 RGB, train 50,000 / test 10,000, 10 classes.

`root` may hold any of (checked in this order, per split):

1. the official python archive as torchvision reads it: ``cifar-10-batches-py/`` (``data_batch_1..5``,
   ``test_batch``), or ``cifar-10-python.tar.gz`` itself (read without extracting); root may also be the
   ``cifar-10-batches-py`` folder. ``download = true`` fetches the archive when none of the forms is there;
2. a class-per-folder tree of images, ``<split>/<class>/<image>`` (class names as in CIFAR-10);
3. a tar of such a tree, ``<split>.tar.gz`` / ``.tgz`` / ``.tar`` (the JPEG copy that ships with this
   project's machines is of this kind).

Each split is decoded once into a uint8 tensor (N, 3, 32, 32) and cached as safetensors in the cache
folder, keyed by the files' paths, sizes and modification times, so later runs start in well under a
second. The tensor stays on the training device (150 MiB for the train split), and batches are cut, flipped
and augmented there.

The python batches are pickles. They are read with an unpickler that accepts only the few numpy names a
CIFAR batch contains (array reconstruction), so a tampered file cannot run code.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fewstep.api import Batch, BuildContext, DataError, DataSpec, index_stream

from .files import (atomic_write, cache_root, decode_many, list_class_folders, main_process_first, progress_bar,
                    read_tar_tree, signature, stat_signature, to_device)
from .source import PixelSource, make_augment_pipe, rank_batches, reference_order

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CACHE_VERSION = 1


# -- the python archive, unpickled safely ----------------------------------------------------------

_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # protocol 2 writes bytes via encode


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals an array pickle needs; anything else is refused."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds only arrays, "
                                         "lists and strings)")
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = module.replace("numpy.core", "numpy._core", 1)  # numpy 2 moved it (same object)
        return getattr(importlib.import_module(module), name)


def read_python_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch -> images (n, 3, 32, 32) uint8 and labels (n,) int64."""
    try:
        d = _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d["labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cifar10: {name} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"cifar10: {name} holds {len(x)} images and {len(y)} labels in 0..9; the file is damaged")
    return x, y


# -- finding a split -------------------------------------------------------------------------------

def find_split(root: Path, split: str) -> tuple[str, list[Path]]:
    """(kind, paths) of the first form of `split` found in root; kind in python | python-archive | folder | tar."""
    for d in (root / BATCH_DIR, root):
        files = [d / f for f in BATCH_FILES[split]]
        if all(f.is_file() for f in files):
            return "python", files
    if (root / ARCHIVE).is_file():
        return "python-archive", [root / ARCHIVE]
    if (root / split).is_dir():
        return "folder", [root / split]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if (root / f"{split}{ext}").is_file():
            return "tar", [root / f"{split}{ext}"]
    return "", []


def download(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, disk full: say what to do instead
        raise DataError(f"cifar10: downloading {URL} into {root} failed ({type(exc).__name__}: {exc}); put the "
                        f"python archive or a <split>/<class>/ image tree in {root} instead") from None


def _check_classes(classes: list[str], where: str) -> None:
    if tuple(classes) != CLASSES:
        raise DataError(f"cifar10: {where} has class folders {classes}; CIFAR-10 needs exactly {list(CLASSES)} "
                        "(use the `imagefolder` dataset for other trees)")


def decode_split(kind: str, paths: list[Path], split: str, bad_images: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one split, from its source."""
    what = f"cifar10 ({split})"
    if kind == "python":
        parts = [read_python_batch(p.read_bytes(), str(p)) for p in paths]
    elif kind == "python-archive":
        parts = []
        try:
            with tarfile.open(paths[0], "r:gz") as tf:
                for name in BATCH_FILES[split]:
                    member = f"{BATCH_DIR}/{name}"
                    f = tf.extractfile(member)
                    parts.append(read_python_batch(f.read(), f"{paths[0]}:{member}"))
        except (KeyError, tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"cifar10: {paths[0]} is not the CIFAR-10 python archive ({type(exc).__name__}: {exc})") from None
    else:
        if kind == "folder":
            fl = list_class_folders(paths[0], what)
            _check_classes(fl.classes, str(paths[0]))
            names = fl.files
            labels = fl.labels
            with progress_bar(f"reading {split} images", len(names)) as advance:
                blobs = []
                for n in names:
                    blobs.append((fl.root / n).read_bytes())
                    advance(1)
        else:
            names, blobs, _ = read_tar_tree(paths[0], what)
            classes = sorted({n.split("/")[0] for n in names})
            _check_classes(classes, str(paths[0]))
            labels = [CLASSES.index(n.split("/")[0]) for n in names]
        with progress_bar(f"decoding {split} images", len(blobs)) as advance:
            arr, keep = decode_many(blobs, [f"{paths[0]}/{n}" if kind == "folder" else f"{paths[0]}:{n}" for n in names],
                                    (32, 32), bad_images, what, advance)
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2)), np.asarray(labels, dtype=np.int64)[keep]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_split(root: Path, split: str, *, download_ok: bool, cache_dir: str, bad_images: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,), description of the source), from the cache when it
    holds this exact source."""
    root = Path(root).expanduser()
    kind, paths = find_split(root, split)
    if not kind and download_ok:
        download(root)
        kind, paths = find_split(root, split)
    if not kind:
        raise DataError(f"cifar10: {root} holds no {split} split: expected {BATCH_DIR}/ or {ARCHIVE} (the python "
                        f"archive), a {split}/<class>/ image tree, or {split}.tar.gz; set download = true to fetch the "
                        "archive (needs internet)")
    if kind == "folder":
        fl = list_class_folders(paths[0], f"cifar10 ({split})")
        sig = signature([CACHE_VERSION, kind, split, bad_images, fl.signature()])
    else:
        sig = signature([CACHE_VERSION, kind, split, bad_images, *(stat_signature(p) for p in paths)])
    where = f"{kind} {', '.join(map(str, paths))}"
    croot = cache_root(cache_dir)
    cached = croot / "cifar10" / f"{split}-{sig[:16]}.safetensors" if croot is not None else None
    if cached is not None and cached.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            t = load_file(str(cached))
            return t["images"], t["labels"], where
        except (SafetensorError, OSError, KeyError):
            pass  # a damaged cache file: decode again and overwrite it
    x, y = decode_split(kind, paths, split, bad_images)
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    if cached is not None:
        from safetensors.torch import save_file

        atomic_write(cached, lambda p: save_file({"images": images, "labels": labels}, str(p),
                                                 metadata={"source": where, "split": split}))
    return images, labels, where


class Cifar10(PixelSource):
    def __init__(self, ctx: BuildContext, *, root: str, split: str, conditional: bool, flip: bool, limit: int,
                 download: bool, cache_dir: str, keep_on_device: bool, bad_images: str, augment: float,
                 augment_xflip: float, augment_yflip: float, augment_scale: float, augment_rotate: float,
                 augment_aniso: float, augment_translate: float):
        super().__init__(flip=flip, pipe=make_augment_pipe(
            augment=augment, augment_xflip=augment_xflip, augment_yflip=augment_yflip, augment_scale=augment_scale,
            augment_rotate=augment_rotate, augment_aniso=augment_aniso, augment_translate=augment_translate))
        if not root:
            raise DataError("cifar10: set data.root to a folder holding CIFAR-10 (the python archive, "
                            "<split>/<class>/ images or <split>.tar.gz)")
        self.root = Path(root).expanduser()
        self.split, self.limit = split, limit
        self._load = dict(download_ok=download, cache_dir=cache_dir, bad_images=bad_images)
        self.device = torch.device(ctx.device) if keep_on_device else torch.device("cpu")
        self.conditional = conditional
        with main_process_first():  # under torchrun rank 0 decodes and caches, the others read the cache
            x, y, self.source = load_split(self.root, split, **self._load)
        if limit:
            x, y = x[:limit], y[:limit]
        self.images = x.to(self.device)  # uint8 (N, 3, 32, 32)
        self.labels = y.to(self.device)
        self.spec = DataSpec((3, 32, 32), 10 if conditional else 0, "cifar10", class_names=CLASSES if conditional else ())
        self._splits: dict[str, torch.Tensor] = {split: x}

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        step = start_step
        for idx in index_stream(len(self.images), batch_size, seed, start_step, rank, world):
            idx = to_device(idx, self.device)
            x = self.images[idx].float() / 127.5 - 1  # (B, 3, 32, 32) in [-1, 1], as ToTensor + Normalize(0.5, 0.5)
            x, cond = self._finish(x, seed, step, rank, world)
            yield Batch(x, self.labels[idx] if self.conditional else None, cond)
            step += 1

    def _split_images(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise DataError(f"cifar10: no split {split!r}; CIFAR-10 has {', '.join(SPLITS)}")
        if split not in self._splits:
            with main_process_first():
                self._splits[split] = load_split(self.root, split, **self._load)[0]
        return self._splits[split]

    def reference_batches(self, split: str = "train", batch_size: int = 256, limit: int | None = None,
                          rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Real images (no flip, no augmentation) in a fixed shuffled order; batch i goes to rank i % world."""
        images = self._split_images(split)
        for idx in rank_batches(reference_order(len(images), limit), batch_size, rank, world):
            yield images[idx].float() / 127.5 - 1

    def reference_images(self, split: str = "train", limit: int | None = None) -> torch.Tensor:
        return torch.cat(list(self.reference_batches(split, 10_000, limit)))
