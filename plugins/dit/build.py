from fewstep.api import BuildContext

from .model import DiT


def build(ctx: BuildContext, *, size: str, depth: int, hidden: int, heads: int, mlp_ratio: float, dropout: float,
          attention: str, gap_init: str) -> DiT:
    spec = ctx.data
    if spec is None or len(spec.shape) != 3:
        raise ValueError(f"dit needs image-shaped (C, H, W) data, got {spec.shape if spec else None}; use the mlp "
                         f"backbone for vector data")
    c, h, w = spec.shape
    if h != w:
        raise ValueError(f"dit needs square inputs, got {h}x{w}")
    return DiT(c, h, spec.num_classes, size=size, depth=depth, hidden=hidden, heads=heads, mlp_ratio=mlp_ratio,
               dropout=dropout, attention=attention, gap_init=gap_init)
