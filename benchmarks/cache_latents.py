"""Throughput of `fewstep cache-latents` with the full-size SD VAE at 256 px, and of the data sources' batches.

Makes ImageNet-like JPEGs (500x375, smooth random content, quality 90) in a temporary folder, or uses a CIFAR-10
tree given with --tar (its 32x32 images are enlarged to 256 px by ADM's bicubic resize), builds AutoencoderKL with
the stabilityai/sd-vae-ft-mse architecture and random weights (the hub is not reachable; the cost is the same),
and reports, one JSON line each:

* encoder alone: images/s of vae.encode at 256 px (fp32 and bf16), no data loading;
* cache-latents end to end: images/s of the encode loop (DataLoader workers decode + ADM crop, encoder, fp16
  shards), and bytes on disk per image;
* latents batches: ms per `batches()` step (posterior draw) at the given batch;
* CIFAR-10-sized augmentation: ms per 1024-image batch of EDM's pipeline (p = 0.12, SoFlow's transforms) on the
  device.

    PYTHONPATH=$PWD python3 benchmarks/cache_latents.py --num 2048 --workers 12
    PYTHONPATH=$PWD python3 benchmarks/cache_latents.py --tiny --num 64 --workers 0 --device cpu   # a CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch


def make_jpeg(args):
    path, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    small.resize((500, 375), resample=Image.BICUBIC).save(path, quality=90)


def make_images(root: Path, num: int, classes: int = 8) -> None:
    jobs = []
    for i in range(num):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"{i:06d}.jpg", i))
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as ex:
        list(ex.map(make_jpeg, jobs, chunksize=64))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=2048, help="images to make (ignored with --tar)")
    ap.add_argument("--tar", type=Path, help="a CIFAR-10 <split>.tar.gz tree to encode instead (enlarged to 256 px)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="images per VAE call")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--dtype", default="fp32,bf16", help="encoder precisions to time")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny VAE of the same structure (CPU smoke run)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    from fewstep.api import BuildContext, Registry
    from fewstep_plugins.latents.cache import cache_latents
    from fewstep_plugins.latents.vae import SD_VAE_CONFIG, load_vae

    device = torch.device(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    images = work / "images"
    t = time.perf_counter()
    if args.tar:
        with tarfile.open(args.tar) as tf:
            tf.extractall(images, filter="data")
        images = next(p for p in images.iterdir() if p.is_dir())  # <split>/
    elif not images.exists():
        make_images(images, args.num)
    n = sum(1 for _ in images.rglob("*.*"))
    print(json.dumps({"what": "source", "images": n, "folder": str(images), "seconds": round(time.perf_counter() - t, 1)}))

    config = dict(SD_VAE_CONFIG)
    if args.tiny:
        config.update(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    torch.manual_seed(0)
    vae_dir = work / "vae"
    AutoencoderKL(**config).save_pretrained(str(vae_dir))
    params = sum(p.numel() for p in AutoencoderKL(**config).parameters())

    for dtype in args.dtype.split(","):
        vae, _ = load_vae(str(vae_dir), device, dtype)
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
        with torch.no_grad():
            for _ in range(3):
                vae.encode(x.to(vae.dtype))
            sync(device)
            t = time.perf_counter()
            reps = 10
            for _ in range(reps):
                vae.encode(x.to(vae.dtype)).latent_dist.mean.float()
            sync(device)
        dt = time.perf_counter() - t
        print(json.dumps({"what": "encoder alone", "dtype": dtype, "params": params, "batch": args.batch,
                          "images_per_s": round(reps * args.batch / dt, 1)}))
        del vae

        out = work / f"cache-{dtype}"
        res = cache_latents(source=str(images), out=out, resolution=args.resolution, vae=str(vae_dir), batch=args.batch,
                            workers=args.workers, shard_size=4096, small_images="upscale", bad_images="error",
                            check="header", dtype=dtype, device=args.device, cache_dir=str(work / "scan-cache"),
                            show_progress=False)
        shard_bytes = sum(p.stat().st_size for p in (out / "shards").glob("*.npy"))
        print(json.dumps({"what": "cache-latents", "dtype": dtype, "images": res.num_images, "batch": args.batch,
                          "workers": args.workers, "encode_seconds": round(res.seconds, 1),
                          "images_per_s": round(res.images_per_second, 1),
                          "shard_bytes_per_image": round(shard_bytes / res.num_images),
                          "folder_bytes_per_image": round(res.bytes_on_disk / res.num_images)}))

    reg = Registry()
    data = reg.get("dataset", "latents").create(BuildContext(), root=str(out), vae=str(vae_dir),
                                                resolution=args.resolution, workers=0)
    b = min(256, len(data))
    stream = data.batches(b, seed=0)
    next(stream)
    t = time.perf_counter()
    for _ in range(20):
        next(stream)
    print(json.dumps({"what": "latents batches", "batch": b, "ms_per_step": round((time.perf_counter() - t) / 20 * 1000, 2)}))

    from fewstep_plugins.images.augment import AugmentPipe
    from fewstep_plugins.images.source import augment_draws

    pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate=0, aniso=1, translate=1)
    x = torch.rand(1024, 3, 32, 32, device=device) * 2 - 1
    for step in range(3):
        pipe.apply(x, augment_draws(pipe, 0, step, 1024))
    sync(device)
    t = time.perf_counter()
    for step in range(3, 23):
        pipe.apply(x, augment_draws(pipe, 0, step, 1024))
    sync(device)
    print(json.dumps({"what": "augmentation", "batch": 1024, "device": str(device),
                      "ms_per_batch": round((time.perf_counter() - t) / 20 * 1000, 2)}))


if __name__ == "__main__":
    main()
