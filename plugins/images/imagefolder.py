"""The `imagefolder` data source: a class-per-folder tree of images of any size (the ImageNet layout),
ADM centre-cropped to `resolution`, decoded lazily by DataLoader workers (never all in memory).

The folder is scanned once at build time: every image's header is read (in `workers` processes), so an
unreadable file or an image smaller than the crop is reported before any work, and the result is cached
(keyed by the files' names, sizes and modification times) so a second run skips the scan. Batches follow
`index_stream`: the global batch of step k is a function of (seed, k) only, rank r decodes its slice, and a
resumed run continues the same stream.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from fewstep.api import Batch, BuildContext, DataError, DataSpec, index_stream

from .crop import adm_center_crop
from .files import (FileList, _examples, atomic_write, cache_root, list_class_folders, main_process_first, open_rgb,
                    progress_bar, signature, to_device)
from .source import PixelSource, make_augment_pipe, rank_batches, reference_order

SCAN_VERSION = 1


# -- the build-time scan ---------------------------------------------------------------------------

class _Headers(torch.utils.data.Dataset):
    """(width, height, error) of each file: the header only, or a full decode when `decode`."""

    def __init__(self, root: Path, files: list[str], decode: bool):
        self.root, self.files, self.decode = root, files, decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            if self.decode:
                w, h = open_rgb(self.root / self.files[i]).size
            else:
                with Image.open(self.root / self.files[i]) as img:
                    w, h = img.size
            return i, w, h, ""
        except Exception as exc:  # noqa: BLE001 - any failure means "unreadable"
            return i, 0, 0, f"{type(exc).__name__}: {exc}"


def _list_collate(items):
    return items


@dataclass
class Scan:
    """The usable images of a folder after the checks: paths relative to `root`, labels, classes."""

    root: Path
    files: list[str]
    labels: list[int]
    classes: list[str]
    signature: str  # of the whole listing (names, sizes, mtimes) and the checks


def scan_folder(root: str | Path, resolution: int, *, small_images: str, bad_images: str, check: str, workers: int,
                cache_dir: str, what: str = "imagefolder", cli: bool = False) -> Scan:
    """The checked images of root/<class>/*; under torchrun rank 0 scans first and the others read its cache."""
    with main_process_first():
        return _scan_folder(root, resolution, small_images=small_images, bad_images=bad_images, check=check,
                            workers=workers, cache_dir=cache_dir, what=what, cli=cli)


def _scan_folder(root: str | Path, resolution: int, *, small_images: str, bad_images: str, check: str, workers: int,
                 cache_dir: str, what: str, cli: bool) -> Scan:
    """List root/<class>/*, read every header (cached), and apply the policies for unreadable images and images
    smaller than `resolution`; DataError names the files when a policy says "error" (and the option to change,
    as a command-line flag when `cli`)."""

    def setting(key: str, value: str) -> str:
        return f"--{key.replace('_', '-')} {value}" if cli else f"{key} = \"{value}\""

    fl: FileList = list_class_folders(Path(root), what)
    sig = signature([SCAN_VERSION, check, fl.signature()])
    croot = cache_root(cache_dir)
    cached = croot / "imagefolder" / f"scan-{sig[:20]}.json" if croot is not None else None
    sizes: list[list[int]] | None = None
    errors: dict[str, str] = {}
    if cached is not None and cached.is_file():
        try:
            d = json.loads(cached.read_text())
            sizes, errors = d["sizes"], d["errors"]
        except (OSError, ValueError, KeyError):
            sizes = None
    if sizes is None or len(sizes) != len(fl.files):
        sizes, errors = [[0, 0]] * len(fl.files), {}
        loader = torch.utils.data.DataLoader(_Headers(fl.root, fl.files, check == "decode"), batch_size=64,
                                             num_workers=workers, collate_fn=_list_collate)
        with progress_bar(f"checking {len(fl.files)} images in {fl.root}", len(fl.files), min_total=5000) as advance:
            for chunk in loader:
                for i, w, h, err in chunk:
                    sizes[i] = [w, h]
                    if err:
                        errors[str(i)] = err
                advance(len(chunk))
        if cached is not None:
            atomic_write(cached, lambda p: p.write_text(json.dumps({"root": str(fl.root), "sizes": sizes,
                                                                    "errors": errors})))
    bad = sorted(int(i) for i in errors)
    if bad and bad_images == "error":
        shown = [f"{fl.root / fl.files[i]} ({errors[str(i)]})" for i in bad]
        raise DataError(f"{what}: {len(bad)} unreadable image(s): {_examples(shown, 2)}; set {setting('bad_images', 'skip')} "
                        "to leave them out")
    skip = set(bad)
    small = [i for i, (w, h) in enumerate(sizes) if i not in skip and min(w, h) < resolution]
    if small and small_images == "error":
        shown = [f"{fl.files[i]} ({sizes[i][0]}x{sizes[i][1]})" for i in small]
        raise DataError(f"{what}: {len(small)} image(s) in {fl.root} are smaller than the {resolution}px crop: "
                        f"{_examples(shown)}; set {setting('small_images', 'upscale')} (ADM's bicubic enlargement) or "
                        f"{setting('small_images', 'skip')}")
    if small_images == "skip":
        skip |= set(small)
    keep = [i for i in range(len(fl.files)) if i not in skip]
    if not keep:
        raise DataError(f"{what}: none of the {len(fl.files)} images in {fl.root} is usable at {resolution}px")
    if skip:
        import warnings

        warnings.warn(f"{what}: left out {len(skip)} of {len(fl.files)} images in {fl.root} "
                      f"({len(bad)} unreadable, {len(skip) - len(bad)} smaller than {resolution}px)", stacklevel=2)
    return Scan(fl.root, [fl.files[i] for i in keep], [fl.labels[i] for i in keep], fl.classes,
                signature([sig, resolution, small_images, bad_images, len(keep)]))


# -- decoding in the workers -----------------------------------------------------------------------

class CroppedImages(torch.utils.data.Dataset):
    """Image i, ADM centre-cropped: (uint8 (3, R, R), i, ok). A file that fails to decode raises a DataError
    naming it, or with on_error = "skip" comes back as zeros with ok = False."""

    def __init__(self, root: Path, files: list[str], resolution: int, what: str = "imagefolder",
                 on_error: str = "raise"):
        self.root, self.files, self.resolution, self.what, self.on_error = root, files, resolution, what, on_error

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.root / self.files[i]
        try:
            img = open_rgb(path)
        except Exception as exc:  # noqa: BLE001
            if self.on_error == "skip":
                return torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), i, False
            raise DataError(f"{self.what}: cannot read {path} ({type(exc).__name__}: {exc}); its header passed the "
                            "build-time check, so the file is truncated or changed since: replace or remove it "
                            "(check = \"decode\" finds such files before any work)") from None
        a = adm_center_crop(img, self.resolution)
        return torch.from_numpy(a.copy()).permute(2, 0, 1), i, True


def clean_worker_error(exc: DataError) -> DataError:
    """A DataError re-raised by a DataLoader carries the worker's traceback; keep its own one line."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    last = lines[-1] if lines else str(exc)
    return DataError(last.split("DataError: ", 1)[-1])


def loader(dataset, batch_sampler, workers: int, prefetch: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=prefetch if workers else None)


class _StepIndices:
    """The batch sampler of training: this rank's indices of global steps start_step, start_step + 1, ..."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, rank: int, world: int):
        self.args = (n, batch_size, seed, start_step, rank, world)

    def __iter__(self):
        for idx in index_stream(*self.args):
            yield idx.tolist()


class ImageFolder(PixelSource):
    def __init__(self, ctx: BuildContext, *, root: str, resolution: int, conditional: bool, flip: bool, workers: int,
                 prefetch: int, small_images: str, bad_images: str, check: str, cache_dir: str, augment: float,
                 augment_xflip: float, augment_yflip: float, augment_scale: float, augment_rotate: float,
                 augment_aniso: float, augment_translate: float):
        super().__init__(flip=flip, pipe=make_augment_pipe(
            augment=augment, augment_xflip=augment_xflip, augment_yflip=augment_yflip, augment_scale=augment_scale,
            augment_rotate=augment_rotate, augment_aniso=augment_aniso, augment_translate=augment_translate))
        if not root:
            raise DataError("imagefolder: set data.root to a folder of class folders (root/<class>/<image>)")
        self.scan = scan_folder(root, resolution, small_images=small_images, bad_images=bad_images, check=check,
                                workers=workers, cache_dir=cache_dir)
        self.resolution, self.workers, self.prefetch = resolution, workers, prefetch
        self.conditional = conditional
        self.device = torch.device(ctx.device)
        self.labels = torch.tensor(self.scan.labels, dtype=torch.long)
        self.items = CroppedImages(self.scan.root, self.scan.files, resolution)
        self.spec = DataSpec((3, resolution, resolution), len(self.scan.classes) if conditional else 0, "imagefolder",
                             class_names=tuple(self.scan.classes) if conditional else ())

    def __len__(self) -> int:
        return len(self.items)

    def _stream(self, sampler) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        try:
            yield from loader(self.items, sampler, self.workers, self.prefetch, pin)
        except DataError as exc:
            raise clean_worker_error(exc) from None

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        step = start_step
        for x, idx, _ in self._stream(_StepIndices(len(self.items), batch_size, seed, start_step, rank, world)):
            x = x.to(self.device, non_blocking=True).float() / 127.5 - 1  # flips and augmentation on the device
            x, cond = self._finish(x, seed, step, rank, world)
            yield Batch(x, to_device(self.labels[idx], self.device) if self.conditional else None, cond)
            step += 1

    def reference_batches(self, split: str = "train", batch_size: int = 256, limit: int | None = None,
                          rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """The folder's images (ADM crop, no flip, no augmentation) in a fixed shuffled order; batch i goes to
        rank i % world. The folder is one split: `split` must be "train"."""
        if split != "train":
            raise DataError(f"imagefolder: {self.scan.root} is one split (\"train\"); there is no {split!r} split")
        batches = [b.tolist() for b in rank_batches(reference_order(len(self.items), limit), batch_size, rank, world)]
        for x, _, _ in self._stream(batches):
            yield x.float() / 127.5 - 1

    def reference_images(self, split: str = "train", limit: int | None = None) -> torch.Tensor:
        return torch.cat(list(self.reference_batches(split, 256, limit)))
