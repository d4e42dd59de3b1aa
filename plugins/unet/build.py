from fewstep.api import BuildContext, OptionError

from .model import SongUNet


def build(ctx: BuildContext, *, model_channels: int, channel_mult: list[int], channel_mult_emb: int,
          channel_mult_noise: int, num_blocks: int, attn_resolutions: list[int], dropout: float,
          resample_filter: list[int], embedding_type: str, fourier_scale: float, encoder_type: str, decoder_type: str,
          augment_dim: int, attention: str, channels_last: bool) -> SongUNet:
    """The factory: every declared option of the `unet` plugin (plugins/unet/__init__.py holds their defaults)."""
    spec = ctx.data
    if spec is None or len(spec.shape) != 3:
        raise OptionError("", f"unet needs image data of shape (C, H, W), got {None if spec is None else spec.shape}")
    c, h, w = spec.shape
    if h != w:
        raise OptionError("", f"unet needs square images, got {h}x{w} from data {spec.name!r}")
    return SongUNet(in_channels=c, image_size=h, num_classes=spec.num_classes, model_channels=model_channels,
                    channel_mult=channel_mult, channel_mult_emb=channel_mult_emb, channel_mult_noise=channel_mult_noise,
                    num_blocks=num_blocks, attn_resolutions=attn_resolutions, dropout=dropout,
                    resample_filter=resample_filter, embedding_type=embedding_type, fourier_scale=fourier_scale,
                    encoder_type=encoder_type, decoder_type=decoder_type, augment_dim=augment_dim, attention=attention,
                    channels_last=channels_last)
