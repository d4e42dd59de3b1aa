"""Image conversions shared by grids, `sample` and the evaluators."""
from __future__ import annotations

from pathlib import Path

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 exactly as the official SoFlow/MeanFlow code: floor(clamp(127.5 x + 128))."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)  # the cast floors (values >= 0)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, min_size: int = 32, *,
              caption: str | None = None, column_labels: list[str] | None = None) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid; tiny images are upscaled (nearest).

    `caption` is drawn in a band above the grid (e.g. "soflow · step 1500 · 1 NFE · EMA 0.999"), and
    `column_labels` (one per grid column, e.g. class names) above each column. The pixels of the grid itself are
    unchanged: they sit below the band.
    """
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
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if caption or column_labels:
        picture = _with_captions(picture, caption, column_labels, cell=imgs.shape[-1] + 2, ncols=min(nrow, n))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    picture.save(tmp)
    tmp.replace(path)
    return path


def caption_band_height(caption: str | None, column_labels: list[str] | None) -> int:
    """Pixels added above a grid by `save_grid`'s caption (16) and column labels (14)."""
    return (16 if caption else 0) + (14 if column_labels else 0)


def _with_captions(grid, caption, column_labels, cell: int, ncols: int):
    from PIL import Image, ImageDraw, ImageFont

    band = caption_band_height(caption, column_labels)
    out = Image.new("RGB", (grid.width, grid.height + band), "white")
    out.paste(grid, (0, band))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=11)
    y = 2
    if caption:
        draw.text((3, y), _fit(draw, caption, font, grid.width - 6), fill="black", font=font)
        y += 16
    if column_labels:
        small = ImageFont.load_default(size=9)
        for j, label in enumerate(column_labels[:ncols]):
            text = _fit(draw, str(label), small, cell - 2)
            w = draw.textlength(text, font=small)
            draw.text((2 + j * cell + (cell - 2 - w) / 2, y), text, fill="black", font=small)
    return out


def _fit(draw, text: str, font, width: float) -> str:
    """`text`, shortened with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid_captions(objective: str, step: int | None, nfe: int, ema: float | str | None, num_classes: int, nrow: int | None,
                  class_names: tuple[str, ...] = ()) -> dict:
    """The caption and column labels of a sample grid: objective, step, NFE and EMA copy; a class per column when
    the grid's columns are the classes (labelled data, `nrow == num_classes`)."""
    parts = [objective]
    if step is not None:
        parts.append(f"step {step}")
    parts.append(f"{nfe} NFE")
    if ema is not None:
        parts.append(f"EMA {ema:g}" if isinstance(ema, float) else f"EMA {ema}")
    labels = None
    if num_classes > 0 and nrow == num_classes:
        labels = list(class_names) if len(class_names) == num_classes else [str(k) for k in range(num_classes)]
    return {"caption": " · ".join(parts), "column_labels": labels}
