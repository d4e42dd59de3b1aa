from fewstep.api import BuildContext

from .model import DiT


def build(ctx: BuildContext, **options) -> DiT:
    spec = ctx.data
    assert spec is not None and len(spec.shape) == 3, f"dit needs (C, H, W) data, got {spec}"
    c, h, w = spec.shape
    if h != w:
        raise ValueError(f"dit needs square inputs, got {h}x{w}")
    return DiT(in_channels=c, image_size=h, num_classes=spec.num_classes, **options)
