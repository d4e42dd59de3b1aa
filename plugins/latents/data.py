"""The `latents` data source: a folder written by `fewstep cache-latents`.

Every step draws a fresh latent from each image's cached posterior, x = (mean + std * eps) * scaling_factor
(SoFlow latent_dataset.py / train.py; MeanFlow's input pipeline does the same), so the model never sees the
same latent twice. eps of row j of global step k comes from a generator keyed by (seed, k, j): the same for
any world size and any resume point. `to_images` decodes with the same VAE after dividing by the factor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fewstep.api import Batch, BuildContext, DataError, DataSource, DataSpec, OptionError, index_stream
from fewstep_plugins.images.files import step_generator
from fewstep_plugins.images.imagefolder import CroppedImages, clean_worker_error, loader
from fewstep_plugins.images.source import rank_batches, reference_order

from . import cache as C
from . import vae as V


class Latents(DataSource):
    def __init__(self, ctx: BuildContext, *, root: str, vae: str, resolution: int, scaling_factor: float,
                 channel_mean: list[float], channel_std: list[float], conditional: bool, vae_dtype: str,
                 decode_batch: int, workers: int):
        if len(channel_mean) != len(channel_std):
            raise OptionError("channel_std", f"latents: channel_mean has {len(channel_mean)} values, channel_std "
                              f"{len(channel_std)}; give both, one value per latent channel (or neither)")
        if not root:
            raise DataError("latents: set data.root to a folder written by `fewstep cache-latents`")
        self.root = Path(root).expanduser()
        meta = C.read_meta(self.root)
        if not meta.get("complete"):
            done = sum(C.shard_done(self.root, k) for k in range(meta["num_shards"]))
            raise DataError(f"latents: {self.root} is an unfinished cache ({done} of {meta['num_shards']} shards); "
                            "run the same `fewstep cache-latents` command again to finish it")
        if resolution != meta["resolution"]:
            raise DataError(f"latents: {self.root} holds {meta['resolution']}px latents but data.resolution = "
                            f"{resolution}; cache the images again with --resolution {resolution} (into another "
                            f"folder) or set data.resolution = {meta['resolution']}")
        self._vae = None
        if vae != meta["vae"]:  # another name may still be the same weights (a local copy of the hub model)
            self._vae, fp = V.load_vae(vae, "cpu", vae_dtype)
            if fp != meta["vae_fingerprint"]:
                raise DataError(f"latents: {self.root} was encoded with the VAE {meta['vae']!r}, but data.vae = {vae!r} "
                                "has other weights; set data.vae to the VAE of the cache, or cache again with "
                                f"--vae {vae}")
        self.meta, self.vae_name, self.vae_dtype = meta, vae, vae_dtype
        self.scaling_factor, self.decode_batch, self.workers = scaling_factor, decode_batch, workers
        self.conditional = conditional
        self.shard_size = meta["shard_size"]
        self.shards = [np.load(C.shard_paths(self.root, k)[0], mmap_mode="r", allow_pickle=False)
                       for k in range(meta["num_shards"])]
        invalid: set[int] = set()
        for k in range(meta["num_shards"]):
            invalid |= set(json.loads(C.shard_paths(self.root, k)[1].read_text())["invalid"])
        n = meta["num_images"]
        self.rows = torch.tensor([i for i in range(n) if i not in invalid], dtype=torch.long)  # usable rows
        self.labels = torch.from_numpy(np.load(self.root / C.LABELS, allow_pickle=False))
        if len(self.labels) != n or sum(len(s) for s in self.shards) != n:
            raise DataError(f"latents: {self.root} is inconsistent ({n} images in {C.META}, {len(self.labels)} labels, "
                            f"{sum(len(s) for s in self.shards)} shard rows); make the cache again")
        self.spec = DataSpec(tuple(meta["latent_shape"]), len(meta["classes"]) if conditional else 0, "latents",
                             class_names=tuple(meta["classes"]) if conditional else ())
        self.channel_mean = self.channel_std = None
        if channel_mean:
            if len(channel_mean) != self.spec.shape[0]:
                raise OptionError("channel_mean", f"latents: {len(channel_mean)} channel_mean values for latents with "
                                  f"{self.spec.shape[0]} channels")
            self.channel_mean = torch.tensor(channel_mean, dtype=torch.float32).view(-1, 1, 1)
            self.channel_std = torch.tensor(channel_std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def posterior(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (mean, std) of image rows, float32 (B, C, h, w) each."""
        z = np.stack([self.shards[i // self.shard_size][i % self.shard_size] for i in rows.tolist()])
        z = torch.from_numpy(z).float()
        return z[:, 0], z[:, 1]

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        step = start_step
        for idx in index_stream(len(self.rows), batch_size, seed, start_step, rank, world):
            rows = self.rows[idx]
            mean, std = self.posterior(rows)
            eps = torch.stack([torch.randn(mean.shape[1:], generator=step_generator(seed, step, f"latent/{rank * batch_size + j}"))
                               for j in range(len(rows))])
            x = self.encode(mean + std * eps)  # a fresh draw from the posterior, scaled to about unit std
            yield Batch(x, self.labels[rows] if self.conditional else None)
            step += 1

    def encode(self, sample: torch.Tensor) -> torch.Tensor:
        """A VAE latent -> model space: x 0.18215 (scaling_factor) or per-channel standardisation."""
        if self.channel_mean is None:
            return sample * self.scaling_factor
        return (sample - self.channel_mean.to(sample.device)) / self.channel_std.to(sample.device)

    def decode_space(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode`."""
        if self.channel_mean is None:
            return x / self.scaling_factor
        return x * self.channel_std.to(x.device, x.dtype) + self.channel_mean.to(x.device, x.dtype)

    # -- back to pixels --------------------------------------------------------------------------
    def vae(self, device) -> "torch.nn.Module":
        if self._vae is None:
            self._vae, _ = V.load_vae(self.vae_name, device, self.vae_dtype)
        return self._vae.to(device)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) in model space -> images in [-1, 1]: decode(the inverse of `encode`)."""
        model = self.vae(x.device)
        return torch.cat([V.decode(model, self.decode_space(x[i:i + self.decode_batch]))
                          for i in range(0, len(x), self.decode_batch)])

    # -- references: the source images the cache was made from ------------------------------------
    def _source(self) -> CroppedImages:
        src = Path(self.meta["source"])
        if not src.is_dir():
            raise DataError(f"latents: the reference images are the cache's source folder {src}, which is not there "
                            "(the cache was made elsewhere); copy it back, or compute the reference statistics on "
                            "the machine that has it")
        files = (self.root / C.FILES).read_text().splitlines()
        return CroppedImages(src, files, self.meta["resolution"], what="latents (reference)")

    def reference_batches(self, split: str = "train", batch_size: int = 256, limit: int | None = None,
                          rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """The source images (ADM crop at the cached resolution, no flip) in a fixed shuffled order; batch i goes
        to rank i % world. The cache is one split: `split` must be "train"."""
        if split != "train":
            raise DataError(f"latents: {self.root} caches one split (\"train\"); there is no {split!r} split")
        items = self._source()
        order = self.rows[reference_order(len(self.rows), limit)]
        batches = [b.tolist() for b in rank_batches(order, batch_size, rank, world)]
        try:
            for x, _, _ in loader(items, batches, self.workers, 2, False):
                yield x.float() / 127.5 - 1
        except DataError as exc:
            raise clean_worker_error(exc) from None

    def reference_images(self, split: str = "train", limit: int | None = None) -> torch.Tensor:
        return torch.cat(list(self.reference_batches(split, 256, limit)))
