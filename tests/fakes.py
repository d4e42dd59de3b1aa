"""Made-up data folders for recipe tests: a CIFAR-10 python archive and a `fewstep cache-latents` folder."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np


def fake_cifar_root(root: Path, n: int = 20, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ with n random training images (and a small test batch)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    chunks = np.array_split(np.arange(n), 5)
    for i, rows in enumerate(chunks, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x[rows], "labels": (rows % 10).tolist(), "batch_label": f"batch {i}"}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x[:10], "labels": list(range(10))}, f, protocol=2)
    return Path(root)


def fake_latents(root: Path, *, n: int = 8, shape=(4, 32, 32), classes: int = 1000, resolution: int = 256,
                 vae: str = "stabilityai/sd-vae-ft-mse", shard_size: int = 4, seed: int = 0) -> Path:
    """A complete latent cache in the layout of plugins/latents/cache.py, filled with random posteriors."""
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_shards = -(-n // shard_size)
    for k in range(num_shards):
        rows = range(k * shard_size, min(n, (k + 1) * shard_size))
        z = rng.standard_normal((len(rows), 2, *shape)).astype(np.float16)
        z[:, 1] = np.abs(z[:, 1]) * 0.1 + 0.05  # std > 0
        np.save(root / "shards" / f"{k:05d}.npy", z)
        (root / "shards" / f"{k:05d}.json").write_text(json.dumps({"count": len(rows), "invalid": []}))
    np.save(root / "labels.npy", (np.arange(n) % classes).astype(np.int64))
    (root / "files.txt").write_text("".join(f"c{i % classes}/{i}.png\n" for i in range(n)))
    meta = {"format": "fewstep-latents", "version": 1, "vae": vae, "vae_fingerprint": "made-up",
            "vae_scaling_factor": 0.18215, "encode_dtype": "fp32", "resolution": resolution, "crop": "adm-center",
            "flip": False, "latent_shape": list(shape), "dtype": "float16", "num_images": n, "shard_size": shard_size,
            "num_shards": num_shards, "classes": [f"c{i}" for i in range(classes)], "source": str(root / "images"),
            "source_signature": "made-up", "complete": True}
    (root / "meta.json").write_text(json.dumps(meta))
    return root
