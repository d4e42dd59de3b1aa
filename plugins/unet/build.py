from fewstep.api import BuildContext, OptionError

from .model import SongUNet


def build(ctx: BuildContext, **options) -> SongUNet:
    """The factory: `options` are the declared options of the `unet` plugin, every one filled in."""
    spec = ctx.data
    if spec is None or len(spec.shape) != 3:
        raise OptionError("", f"unet needs image data of shape (C, H, W), got {None if spec is None else spec.shape}")
    c, h, w = spec.shape
    if h != w:
        raise OptionError("", f"unet needs square images, got {h}x{w} from data {spec.name!r}")
    return SongUNet(in_channels=c, image_size=h, num_classes=spec.num_classes, **options)
