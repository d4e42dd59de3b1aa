"""scikit-learn's handwritten digits (UCI optdigits test set, 1797 images of 8x8, values 0..16)."""
from __future__ import annotations

import torch

from fewstep.api import BuildContext, TensorSource


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as this source yields them: x = v / 8 - 1, (1797, 1, 8, 8) float32 in [-1, 1], labels (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (1797, 1, 8, 8) in [-1, 1]
    return x, torch.tensor(d.target, dtype=torch.long)


class Digits(TensorSource):
    def __init__(self, ctx: BuildContext, *, conditional: bool, limit: int):
        x, y = real_digits()
        if limit:
            x, y = x[:limit], y[:limit]
        super().__init__(x, y if conditional else None, 10 if conditional else 0, "digits",
                         class_names=tuple(str(k) for k in range(10)) if conditional else ())
