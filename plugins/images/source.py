"""What the pixel data sources share: per-step flips and EDM augmentation, and the reference order."""
from __future__ import annotations

import torch

from fewstep.api import DataSource, epoch_permutation

from .augment import AugmentDraw, AugmentPipe
from .files import step_generator, to_device


def make_augment_pipe(*, augment: float, augment_xflip: float, augment_yflip: float, augment_scale: float,
                      augment_rotate: float, augment_aniso: float, augment_translate: float) -> AugmentPipe | None:
    """The recipe's augmentation options as a pipeline; `augment = 0` means none (and no labels)."""
    if augment <= 0:
        return None
    return AugmentPipe(p=augment, xflip=augment_xflip, yflip=augment_yflip, scale=augment_scale, rotate=augment_rotate,
                       aniso=augment_aniso, translate=augment_translate)


def flip_coins(seed: int, step: int, n: int) -> torch.Tensor:
    """(n,) bool: which rows of global step `step` the `flip` option mirrors (probability 1/2 each)."""
    return torch.rand(n, generator=step_generator(seed, step, "flip")) < 0.5


def augment_draws(pipe: AugmentPipe, seed: int, step: int, n: int) -> AugmentDraw:
    """The augmentation choices for the n rows of global step `step`."""
    return pipe.draw(n, step_generator(seed, step, "augment"))


def reference_order(n: int, limit: int | None) -> torch.Tensor:
    """The fixed order reference images are streamed in: one seeded permutation, so the first `limit` images are a
    uniform sample of the set (a class-sorted folder would otherwise give the first classes only)."""
    order = epoch_permutation(n, 0, 0)
    return order[:limit] if limit else order


def rank_batches(order: torch.Tensor, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """Batch i of `order` goes to rank i % world (the DataSource.reference_batches contract)."""
    return [order[i:i + batch_size] for k, i in enumerate(range(0, len(order), batch_size)) if k % world == rank]


class PixelSource(DataSource):
    """Images in [-1, 1] with the optional unlabelled flip and the labelled EDM augmentation, both drawn per
    global step (a function of (seed, step); rank r applies rows [r B, (r + 1) B) of the global draws)."""

    def __init__(self, *, flip: bool, pipe: AugmentPipe | None):
        self.flip = flip
        self.pipe = pipe

    @property
    def augment_dim(self) -> int:
        """Length of Batch.cond["augment_labels"] (0: no augmentation); the U-Net's `augment_dim`."""
        return self.pipe.dim if self.pipe is not None else 0

    def _finish(self, x: torch.Tensor, seed: int, step: int, rank: int, world: int) -> tuple[torch.Tensor, dict]:
        """x: this rank's rows of global step `step`, float in [-1, 1] on any device."""
        b = len(x)
        rows = slice(rank * b, (rank + 1) * b)
        if self.flip:
            coins = to_device(flip_coins(seed, step, b * world)[rows], x.device)
            x = torch.where(coins[:, None, None, None], x.flip(3), x)
        cond = {}
        if self.pipe is not None:
            d = augment_draws(self.pipe, seed, step, b * world)[rows]
            x = self.pipe.apply(x, d)
            cond["augment_labels"] = to_device(self.pipe.labels(d), x.device)
        return x, cond
