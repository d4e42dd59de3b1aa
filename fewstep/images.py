"""Image conversions shared by grids, `sample` and the evaluators."""
from __future__ import annotations

from pathlib import Path

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 exactly as the official SoFlow/MeanFlow code: floor(clamp(127.5 x + 128))."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)  # the cast floors (values >= 0)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, min_size: int = 32) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid; tiny images are upscaled (nearest)."""
    from PIL import Image
    from torchvision.utils import make_grid

    imgs = images.detach().float().cpu()
    if imgs.shape[-1] < min_size:
        factor = -(-min_size // imgs.shape[-1])
        imgs = torch.nn.functional.interpolate(imgs, scale_factor=factor, mode="nearest")
    n = imgs.shape[0]
    nrow = nrow or max(1, int(round(n ** 0.5)))
    grid = make_grid(to_uint8(imgs), nrow=nrow, padding=2, pad_value=255)
    if grid.shape[0] == 1:
        grid = grid.repeat(3, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp)
    tmp.replace(path)
    return path
