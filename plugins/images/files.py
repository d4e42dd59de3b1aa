"""Finding, decoding and caching images: class-per-folder trees, tar archives, per-step random draws."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from fewstep.api import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ENV_CACHE = "FEWSTEP_CACHE"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (there is no getter)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _examples(items: list[str], k: int = 3) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


# -- where decoded data and scans are cached -------------------------------------------------------

def cache_root(option: str) -> Path | None:
    """The cache folder an option names: "auto" = $FEWSTEP_CACHE, else $XDG_CACHE_HOME/fewstep, else
    ~/.cache/fewstep; "" or "none" = no cache; anything else is a path."""
    if option in ("", "none"):
        return None
    if option != "auto":
        return Path(option).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fewstep"


def atomic_write(path: Path, write: Callable[[Path], None]) -> bool:
    """Write through a process-unique temporary file and rename it into place (safe with several ranks
    writing the same file). Returns False, quietly, when the folder is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # some writers (safetensors) create 0600 files; caches may be shared
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            tmp.unlink()
        return False


def signature(parts: Iterable[object]) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def stat_signature(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


# -- class-per-folder trees ----------------------------------------------------------------------

@dataclass
class FileList:
    """The images of a class-per-folder tree, sorted by (class, path); labels index `classes`."""

    root: Path
    files: list[str]  # paths relative to root, '/'-separated
    labels: list[int]
    classes: list[str]
    stats: list[tuple[int, int]] = field(default_factory=list)  # (size, mtime_ns) per file

    def signature(self) -> str:
        return signature([str(self.root.resolve()), len(self.files), *zip(self.files, self.stats)])


def list_class_folders(root: Path, what: str) -> FileList:
    """Every image file under root/<class>/ (any depth), in a fixed order. DataError when there is nothing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{what}: {root} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = [e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name)]
        if loose:
            raise DataError(f"{what}: {root} holds images but no class folders; put them in {root}/<class>/ "
                            f"(one folder per class, e.g. {root}/all/ for unlabelled data)")
        raise DataError(f"{what}: no images in {root}: it has no class folders (expected {root}/<class>/*.jpg)")
    files, labels, stats, empty = [], [], [], []
    for k, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if is_image_name(name) and not name.startswith("."):
                    found.append(os.path.join(dirpath, name))
        if not found:
            empty.append(cls)
        for full in sorted(found):
            st = os.stat(full)
            files.append(os.path.relpath(full, root).replace(os.sep, "/"))
            labels.append(k)
            stats.append((st.st_size, st.st_mtime_ns))
    if not files:
        raise DataError(f"{what}: no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in its "
                        f"{len(classes)} class folders)")
    if empty:
        raise DataError(f"{what}: class folders without images in {root}: {_examples(empty)}; remove them or add "
                        "images (every class folder is a label)")
    return FileList(root, files, labels, classes, stats)


# -- decoding --------------------------------------------------------------------------------------

def open_rgb(source) -> "PIL.Image.Image":  # noqa: F821
    """Open and fully decode an image (path or bytes) as RGB; raises on unreadable data."""
    from PIL import Image

    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    img.load()
    return img.convert("RGB")


def decode_many(blobs: list[bytes], names: list[str], size: tuple[int, int] | None, bad_images: str, what: str,
                advance: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, list[int]]:
    """Decode encoded images to one (N, H, W, 3) uint8 array. JPEGs go through torchvision's batched
    libjpeg-turbo decoder (pixel-identical to PIL's), everything else and any failure through PIL, so a bad
    file is named. `size` = (H, W) that every image must have. Returns the array and the kept positions."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[np.ndarray | None] = [None] * len(blobs)
    bad: list[str] = []
    jpeg = [i for i, b in enumerate(blobs) if b[:3] == b"\xff\xd8\xff"]
    is_jpeg = set(jpeg)
    chunk = 1024
    for s in range(0, len(jpeg), chunk):
        ids = jpeg[s:s + chunk]
        try:
            dec = decode_jpeg([torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in ids],
                              mode=ImageReadMode.RGB)
            for i, t in zip(ids, dec):
                out[i] = t.permute(1, 2, 0).numpy()
        except RuntimeError:
            pass  # one of them is broken: PIL below decodes them one by one and names it
        advance(len(ids))
    for i, b in enumerate(blobs):
        if out[i] is not None:
            continue
        try:
            out[i] = np.asarray(open_rgb(b))
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
            bad.append(f"{names[i]} ({type(exc).__name__}: {exc})")
        if i not in is_jpeg:
            advance(1)
    wrong = []
    if size is not None:
        for i, a in enumerate(out):
            if a is not None and a.shape[:2] != size:
                wrong.append(f"{names[i]} is {a.shape[1]}x{a.shape[0]}")
                out[i] = None
    if (bad or wrong) and bad_images == "error":
        if bad:
            raise DataError(f"{what}: {len(bad)} unreadable image(s): {_examples(bad, 2)}; set "
                            "bad_images = \"skip\" to leave them out")
        raise DataError(f"{what}: {len(wrong)} image(s) of the wrong size (expected {size[1]}x{size[0]}): "
                        f"{_examples(wrong)}; set bad_images = \"skip\" to leave them out")
    if bad or wrong:
        import warnings

        warnings.warn(f"{what}: skipped {len(bad) + len(wrong)} unreadable or wrongly sized image(s): "
                      f"{_examples(bad + wrong)}", stacklevel=2)
    keep = [i for i, a in enumerate(out) if a is not None]
    if not keep:
        raise DataError(f"{what}: none of the {len(blobs)} images could be used")
    return np.stack([out[i] for i in keep]), keep


def read_tar_tree(path: Path, what: str) -> tuple[list[str], list[bytes], str]:
    """Members `<top>/<class>/<file>` of a (compressed) tar of one class-per-folder tree: names (without
    the top folder), contents, and the top folder's name. Nothing is extracted to disk."""
    names, blobs = [], []
    tops = set()
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile() or not is_image_name(m.name):
                    continue
                parts = Path(m.name).parts
                if len(parts) < 2:
                    continue
                tops.add(parts[0] if len(parts) >= 3 else "")
                names.append("/".join(parts[1:]) if len(parts) >= 3 else "/".join(parts))
                blobs.append(tf.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{what}: cannot read the archive {path} ({type(exc).__name__}: {exc})") from None
    if not names:
        raise DataError(f"{what}: no images in the archive {path} (expected <split>/<class>/<image> members)")
    order = sorted(range(len(names)), key=lambda i: names[i])
    return [names[i] for i in order], [blobs[i] for i in order], "/".join(sorted(tops))


# -- several processes ------------------------------------------------------------------------------

@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Under torchrun (process group initialised), rank 0 runs the block first and the other ranks after it,
    so that they find what it cached (a folder scan, a decoded split) instead of all doing the work at once."""
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if active and dist.get_rank() != 0:
        dist.barrier()
    yield
    if active and dist.get_rank() == 0:
        dist.barrier()


# -- progress --------------------------------------------------------------------------------------

def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, min_total: int = 2000) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (rank 0 only, and only for loops of at least `min_total` items);
    yields `advance(n)`."""
    if not (enabled and is_main_process() and total >= min_total):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.advance(task, n)


# -- per-step random draws: a function of (seed, step) only --------------------------------------------

def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor to `device` without the host waiting: through pinned memory with a non-blocking copy on CUDA
    (a copy from pageable memory may wait for the work already queued on the device). The same values."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator for the random choices of global step `step` (flips, augmentations, latent noise):
    the same for any world size and any resume point."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
