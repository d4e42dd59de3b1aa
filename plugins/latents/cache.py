"""`fewstep cache-latents`: encode every image of a class-per-folder tree once with the VAE.

Layout of the output folder (no pickles anywhere)::

    meta.json              format, VAE (name and weight fingerprint), resolution, crop, latent shape,
                           shard size, classes, source folder and its listing signature, "complete"
    files.txt              the source images, one path (relative to the source folder) per line: row i
    labels.npy             int64 (N,): the class-folder index of row i
    shards/00000.npy       float16 (n, 2, C, h, w): [posterior mean, posterior std] of rows
                           [k S, k S + n), S = shard_size, readable as a memory map
    shards/00000.json      {"count": n, "invalid": [...]}: written after the .npy, it marks the shard done

Images are ADM centre-cropped to `resolution` and never flipped (SoFlow's and MeanFlow's ImageNet
latents). Shard k is encoded by rank k % world; a killed run continues where it stopped when started again
with the same arguments (finished shards are kept, everything else is redone).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.api import DataError
from fewstep_plugins.images.files import atomic_write, progress_bar
from fewstep_plugins.images.imagefolder import CroppedImages, clean_worker_error, loader, scan_folder

from . import vae as V

FORMAT = "fewstep-latents"
VERSION = 1
CROP = "adm-center"
META, FILES, LABELS, SHARDS = "meta.json", "files.txt", "labels.npy", "shards"
# keys that must agree for a run to continue an existing folder
_SAME = ("format", "version", "vae_fingerprint", "resolution", "crop", "flip", "source_signature", "num_images",
         "shard_size", "latent_shape", "dtype")


def shard_paths(out: Path, k: int) -> tuple[Path, Path]:
    return out / SHARDS / f"{k:05d}.npy", out / SHARDS / f"{k:05d}.json"


def shard_done(out: Path, k: int) -> bool:
    data, record = shard_paths(out, k)
    return data.is_file() and record.is_file()


def read_meta(out: Path, what: str = "latents") -> dict:
    path = Path(out).expanduser() / META
    if not path.is_file():
        raise DataError(f"{what}: {path.parent} is not a latent cache (no {META}); make one with "
                        f"`fewstep cache-latents --data imagefolder:DIR --out {path.parent}`")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{what}: {path} is damaged ({exc}); make the cache again") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{what}: {path} is not a {FORMAT} v{VERSION} cache (format {meta.get('format')!r}, "
                        f"version {meta.get('version')!r})")
    return meta


@dataclass
class CacheResult:
    out: Path
    num_images: int
    encoded_here: int  # images this process encoded (0 when everything was done already)
    seconds: float
    bytes_on_disk: int
    complete: bool

    @property
    def images_per_second(self) -> float:
        return self.encoded_here / self.seconds if self.seconds > 0 else float("nan")


def _dist():
    """(rank, world, barrier) from torchrun's environment; a gloo group for the barriers when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return rank, world, dist.barrier


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("cache-latents: --device cuda but no CUDA device is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def cache_latents(*, source: str, out: Path, resolution: int, vae: str, batch: int, workers: int, shard_size: int,
                  small_images: str, bad_images: str, check: str, dtype: str, device: str, cache_dir: str,
                  show_progress: bool = True) -> CacheResult:
    out = Path(out).expanduser()
    rank, world, barrier = _dist()
    dev = resolve_device(device)
    scan = scan_folder(source, resolution, small_images=small_images, bad_images=bad_images, check=check,
                       workers=workers, cache_dir=cache_dir, what="cache-latents", cli=True)
    model, fp = V.load_vae(vae, dev, dtype)
    factor = V.downsampling(model)
    if resolution % factor:
        raise DataError(f"cache-latents: --resolution {resolution} is not a multiple of the VAE's downsampling {factor}")
    n = len(scan.files)
    latent_shape = [model.config.latent_channels, resolution // factor, resolution // factor]
    meta = {"format": FORMAT, "version": VERSION, "vae": vae, "vae_fingerprint": fp,
            "vae_scaling_factor": float(getattr(model.config, "scaling_factor", V.DEFAULT_SCALING)),
            "encode_dtype": dtype, "resolution": resolution, "crop": CROP, "flip": False,
            "latent_shape": latent_shape, "dtype": "float16", "num_images": n, "shard_size": shard_size,
            "num_shards": math.ceil(n / shard_size), "classes": scan.classes, "source": str(scan.root.resolve()),
            "source_signature": scan.signature, "complete": False}
    old = None
    if (out / META).is_file():
        old = read_meta(out, "cache-latents")
        diff = [f"{k}: {old.get(k)!r} (in the folder) != {meta[k]!r}" for k in _SAME if old.get(k) != meta[k]]
        if diff:
            raise DataError(f"cache-latents: {out} holds latents made with other settings ({'; '.join(diff)}); "
                            "choose another --out or delete the folder")
    if rank == 0:
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        for stale in (out / SHARDS).glob(".*.tmp*"):  # what a killed run was writing
            stale.unlink(missing_ok=True)
        if old is None:
            atomic_write(out / FILES, lambda p: p.write_text("".join(f + "\n" for f in scan.files)))
            atomic_write(out / LABELS, lambda p: np.save(p, np.asarray(scan.labels, dtype=np.int64)))
            if not atomic_write(out / META, lambda p: p.write_text(json.dumps(meta, indent=1))):
                raise DataError(f"cache-latents: cannot write into {out}")
    barrier()

    todo = [k for k in range(meta["num_shards"]) if k % world == rank and not shard_done(out, k)]
    batches = [list(range(s, min(s + batch, (k + 1) * shard_size, n)))
               for k in todo for s in range(k * shard_size, min((k + 1) * shard_size, n), batch)]
    items = CroppedImages(scan.root, scan.files, resolution, what="cache-latents",
                          on_error="skip" if bad_images == "skip" else "raise")
    encoded, t0 = 0, time.perf_counter()
    total = sum(len(b) for b in batches)
    current, buf, invalid = None, None, []
    with progress_bar(f"encoding (rank {rank} of {world})" if world > 1 else "encoding", total,
                      enabled=show_progress, min_total=1) as advance:
        try:
            for x, idx, ok in loader(items, batches, workers, 2, dev.type == "cuda"):
                k = int(idx[0]) // shard_size
                if k != current:
                    current, start = k, k * shard_size
                    buf = np.zeros((min(shard_size, n - start), 2, *latent_shape), dtype=np.float16)
                    invalid = []
                mean, std = V.encode(model, x.to(dev, non_blocking=True).float() / 127.5 - 1)
                rows = (idx - start).numpy()
                buf[rows, 0] = mean.cpu().numpy()
                buf[rows, 1] = std.cpu().numpy()
                invalid += [int(i) for i in idx[~ok]]
                encoded += len(idx)
                advance(len(idx))
                if int(idx[-1]) == start + len(buf) - 1:  # the shard's last batch
                    write_shard(out, k, buf, invalid)
        except DataError as exc:
            raise clean_worker_error(exc) from None
    seconds = time.perf_counter() - t0
    barrier()
    complete = all(shard_done(out, k) for k in range(meta["num_shards"]))
    if rank == 0 and complete:
        done = {**(old or meta), "complete": True}
        atomic_write(out / META, lambda p: p.write_text(json.dumps(done, indent=1)))
    barrier()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return CacheResult(out, n, encoded, seconds, size, complete)


def write_shard(out: Path, k: int, buf: np.ndarray, invalid: list[int]) -> None:
    data, record = shard_paths(out, k)
    if not atomic_write(data, lambda p: np.save(p, buf)):
        raise DataError(f"cache-latents: cannot write {data}")
    atomic_write(record, lambda p: p.write_text(json.dumps({"count": len(buf), "invalid": invalid})))
