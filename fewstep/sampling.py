"""Generate samples from a trained model: fixed noise and labels, batched, no gradients."""
from __future__ import annotations

from typing import Any

import torch

from .interfaces import DataSource, Objective, Sampler


def fixed_noise_and_labels(n: int, shape: tuple[int, ...], num_classes: int, seed: int, balanced: bool = True):
    """Noise and labels drawn from a CPU generator seeded with `seed` (identical across devices)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    if num_classes <= 0:
        return noise, None
    if balanced:  # grids: classes in order, so a row of a 10-wide grid shows every class
        labels = torch.arange(n) % num_classes
    else:  # metrics: uniform random labels, as the official evaluation does
        labels = torch.randint(0, num_classes, (n,), generator=g)
    return noise, labels


@torch.no_grad()
def generate(objective: Objective, sampler: Sampler, net: torch.nn.Module, data: DataSource, n: int, nfe: int,
             seed: int = 0, batch: int = 256, device: Any = "cpu", balanced: bool = True, progress: Any = None) -> torch.Tensor:
    """n images in [-1, 1] (decoded to pixel space), on the CPU."""
    was_training = net.training
    net.eval()
    noise, labels = fixed_noise_and_labels(n, data.spec.shape, data.spec.num_classes, seed, balanced)
    gen = torch.Generator(device=device).manual_seed(seed + 1)  # re-noising draws (SoFlow/ECT multi-step)
    out = []
    for i in range(0, n, batch):
        e = noise[i:i + batch].to(device)
        y = labels[i:i + batch].to(device) if labels is not None else None
        x0 = sampler.sample(objective, net, e, y, nfe, generator=gen)
        out.append(data.to_images(x0).float().cpu())
        if progress is not None:
            progress(len(e))
    net.train(was_training)
    return torch.cat(out)


def save_sample_grid(data: DataSource, imgs: torch.Tensor, path, *, objective: str, nfe: int, step: int | None = None,
                     ema: float | None = None):
    """Write a grid of generated samples through the data source's `save_preview`, captioned with what made it
    (objective, step, NFE, EMA copy) and, for labelled data with one class per column, the class names.

    A third-party `save_preview` written before captions existed (no `caption` keyword) is called without them."""
    import inspect

    from .images import grid_captions

    spec = data.spec
    nrow = spec.num_classes if 0 < spec.num_classes <= 16 else None
    extra = grid_captions(objective, step, nfe, ema, spec.num_classes, nrow, getattr(spec, "class_names", ()))
    params = inspect.signature(data.save_preview).parameters
    if not ("caption" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())):
        extra = {}
    return data.save_preview(imgs, path, nrow=nrow, **extra)
