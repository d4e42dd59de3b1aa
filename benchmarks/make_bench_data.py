"""Synthetic data in the real on-disk formats, for `fewstep bench` on a machine without the data sets.

    python benchmarks/make_bench_data.py --out /tmp/fewstep-bench-data [--cifar 10000] [--latents 4096]
        [--vae-dir DIR]   # also save a randomly initialised sd-vae-ft-mse AutoencoderKL there (needs diffusers)

Writes
* OUT/cifar10/train/<class>/<i>.png: 32x32 RGB images of smooth random content (the CIFAR-10 image-tree layout
  the `cifar10` data source reads, `root = "OUT/cifar10"`);
* OUT/latents/: a complete `fewstep cache-latents` folder (meta.json, labels.npy, shards/*.npy + .json) of random
  posteriors (4 x 32 x 32, 1000 classes, 256 px; --resolution 512: 4 x 64 x 64), `vae` = --vae-dir when given, else stabilityai/sd-vae-ft-mse
  (which is only loaded when samples are decoded).
The step's cost does not depend on the pixel values; recipes/bench_*.toml read these folders.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar(out: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (out / "train" / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((32, 32), Image.BILINEAR)
        img.save(out / "train" / CLASSES[i % 10] / f"{i:05d}.png")


def latents(out: Path, n: int, vae: str, seed: int = 0, shard_size: int = 4096, resolution: int = 256) -> None:
    rng = np.random.default_rng(seed)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shape = [4, resolution // 8, resolution // 8]
    num_shards = math.ceil(n / shard_size)
    for k in range(num_shards):
        m = min(shard_size, n - k * shard_size)
        buf = np.empty((m, 2, *shape), dtype=np.float16)
        buf[:, 0] = rng.standard_normal((m, *shape)) * 5.0  # latent means of SD-VAE scale (x 0.18215 -> about 1)
        buf[:, 1] = np.abs(rng.standard_normal((m, *shape))) * 0.1
        np.save(out / "shards" / f"{k:05d}.npy", buf)
        (out / "shards" / f"{k:05d}.json").write_text(json.dumps({"count": m, "invalid": []}))
    np.save(out / "labels.npy", (np.arange(n) % 1000).astype(np.int64))
    (out / "files.txt").write_text("".join(f"class{i % 1000:04d}/{i:06d}.JPEG\n" for i in range(n)))
    meta = {"format": "fewstep-latents", "version": 1, "vae": vae, "vae_fingerprint": "synthetic",
            "vae_scaling_factor": 0.18215, "encode_dtype": "fp32", "resolution": resolution, "crop": "adm-center", "flip": False,
            "latent_shape": shape, "dtype": "float16", "num_images": n, "shard_size": shard_size, "num_shards": num_shards,
            "classes": [f"class{i:04d}" for i in range(1000)], "source": str(out / "no-source-images"),
            "source_signature": "synthetic", "complete": True}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def random_vae(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    from fewstep_plugins.latents.vae import SD_VAE_CONFIG

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(str(path), safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cifar", type=int, default=10000, help="images in the CIFAR-10 tree (0: none)")
    ap.add_argument("--latents", type=int, default=4096, help="rows of the latent cache (0: none)")
    ap.add_argument("--resolution", type=int, default=256, help="image side the latents stand for (latents 4 x side/8 x "
                    "side/8: 512 gives 4 x 64 x 64, 1024 tokens for a /2 DiT)")
    ap.add_argument("--vae-dir", type=Path, default=None, help="save a random-weight SD VAE here and name it in the cache")
    args = ap.parse_args()
    if args.cifar:
        cifar(args.out / "cifar10", args.cifar)
    vae = "stabilityai/sd-vae-ft-mse"
    if args.vae_dir is not None:
        random_vae(args.vae_dir)
        vae = str(args.vae_dir)
    if args.latents:
        latents(args.out / "latents", args.latents, vae, resolution=args.resolution)
    print(f"wrote {args.out} (vae: {vae})")


if __name__ == "__main__":
    main()
