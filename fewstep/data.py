"""Data-source helpers for plugin authors: deterministic, resumable, world-size-independent order."""
from __future__ import annotations

from typing import Iterator

import torch

from .interfaces import Batch, DataSource, DataSpec

DEVICE_SHARE = 0.25  # an in-memory data set moves to the training device when it takes at most this share of the free memory


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so any step can be resumed."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def index_stream(n: int, batch: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Indices of this rank's slice of each global batch, from global step `start_step` on.

    The global batch of step k is positions [k*B*world, (k+1)*B*world) of the concatenated
    epoch permutations: the same data order for any world size and any resume point.
    """
    gb = batch * world
    pos = start_step * gb
    while True:
        epoch, off = divmod(pos, n)
        idx: list[int] = []
        while len(idx) < gb:
            perm = epoch_permutation(n, seed, epoch)
            idx += perm[off:off + gb - len(idx)].tolist()
            epoch, off = epoch + 1, 0
        pos += gb
        yield torch.tensor(idx[rank * batch:(rank + 1) * batch])


class TensorSource(DataSource):
    """A data source over in-memory tensors: x in [-1, 1] (N, C, H, W) and optional labels (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, num_classes: int, name: str,
                 class_names: tuple[str, ...] = ()):
        self.x, self.y = x, y
        self._on_device: tuple[torch.Tensor, torch.Tensor | None] | None = None  # copies on the device (place)
        self.spec = DataSpec(tuple(x.shape[1:]), num_classes, name, class_names=tuple(class_names))

    def place(self, device, share: float = DEVICE_SHARE, free_bytes: int | None = None) -> str:
        """Move x and y to a CUDA `device` when together they take at most `share` of its free memory
        (`free_bytes`: torch.cuda.mem_get_info's figure unless given). The data order is computed as before, on
        the CPU, and the rows are picked on the device: the same batches, bit for bit."""
        device = torch.device(device)
        if device.type != "cuda" or self.x.device == device or getattr(self, "_on_device", None) is not None:
            return ""
        need = self.x.nbytes + (self.y.nbytes if self.y is not None else 0)
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0]
        if need > share * free_bytes:
            return (f"{self.spec.name}: {need / 2**20:.0f} MiB of data stay in host memory (more than "
                    f"{share:.0%} of the {free_bytes / 2**30:.1f} GiB free on {device}); batches are prefetched")
        self._on_device = (self.x.to(device), None if self.y is None else self.y.to(device))  # x, y stay as they are
        return f"{self.spec.name}: {need / 2**20:.1f} MiB of data held on {device}"

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        x, y = getattr(self, "_on_device", None) or (self.x, self.y)
        for idx in index_stream(len(self.x), batch_size, seed, start_step, rank, world):
            # on a GPU the indices go through pinned memory: a copy from pageable memory may wait for the device
            idx = idx.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else idx
            yield Batch(x[idx], None if y is None else y[idx])

    def reference_images(self, split: str = "train", limit: int | None = None) -> torch.Tensor:
        return self.x[:limit] if limit else self.x
