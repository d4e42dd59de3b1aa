"""SongUNet-style U-Net for small images: net(x, t, s, y, augment_labels=None), the CIFAR-10 backbone of
SoFlow, MeanFlow (py-meanflow) and ECT.

Written for fewstep from the DDPM++ / NCSN++ descriptions (Song et al. 2021, appendix H; Karras et
al. 2022, appendix F.2); the layers are in layers.py, the facts and their official sources in
docs/backbones.md. Per resolution (image_size >> level for each entry of channel_mult):

    encoder: [3x3 conv in | down block], num_blocks blocks (attention where res in attn_resolutions)
    decoder: [two middle blocks, the first with attention | up block], num_blocks + 1 blocks, each
             fed the concatenation with one encoder output (attention on the last where res matches)
    output:  GroupNorm, SiLU, 3x3 conv to the image channels (near-zero init)

Conditioning, as the official SoFlow and py-meanflow CIFAR models do it: the features of t and of the
gap t - s, each model_channels * channel_mult_noise wide, are concatenated; a label embedding (one-hot
times sqrt(num_classes), the null class is the zero vector) and a linear map of the augmentation
labels are added; a two-layer SiLU MLP (the mapping network) makes the embedding every block adds.
Raw t in [0, 1] goes into the features (fewstep's time convention, t = 0 data).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.api import OptionError

from .layers import SKIP_SCALE, Conv2d, FourierEmbedding, PositionalEmbedding, UNetBlock, group_norm, linear

ATTENTION_HEADS = 1  # SongUNet attends with a single head over all channels


class SongUNet(nn.Module):
    """net(x, t, s, y=None, augment_labels=None): x (B, C, H, W), t and s (B,) in [0, 1] with s <= t,
    y (B,) int64 with `num_classes` as the null class (None: all null), augment_labels (B, augment_dim)
    (None: no augmentation, the same as zeros)."""

    #: extra per-row conditions this backbone accepts (Batch.cond keys)
    conditions = ("augment_labels",)

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, model_channels: int,
                 channel_mult: list[int], channel_mult_emb: int, channel_mult_noise: int, num_blocks: int,
                 attn_resolutions: list[int], dropout: float, resample_filter: list[int], embedding_type: str,
                 fourier_scale: float, encoder_type: str, decoder_type: str, augment_dim: int, attention: str,
                 channels_last: bool):
        super().__init__()
        levels = len(channel_mult)
        check_options(image_size, model_channels, channel_mult, channel_mult_noise, attn_resolutions,
                      resample_filter, embedding_type, encoder_type, decoder_type)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.augment_dim, self.channels_last = augment_dim, channels_last
        emb = model_channels * channel_mult_emb  # width of the embedding every block receives
        noise = model_channels * channel_mult_noise  # width of the features of t (and of t - s)
        taps = list(resample_filter)
        block = dict(emb_channels=emb, dropout=dropout, taps=taps, heads=ATTENTION_HEADS)

        # --- mapping network: [feat(t) | feat(t - s)] + label + augmentation -> 2-layer SiLU MLP
        if embedding_type == "positional":
            self.map_noise, self.map_gap = PositionalEmbedding(noise), PositionalEmbedding(noise)
        else:
            self.map_noise, self.map_gap = FourierEmbedding(noise, fourier_scale), FourierEmbedding(noise, fourier_scale)
        self.map_label = linear(num_classes, 2 * noise) if num_classes else None
        self.map_augment = linear(augment_dim, 2 * noise, bias=False) if augment_dim else None
        self.map_layer0 = linear(2 * noise, emb)
        self.map_layer1 = linear(emb, emb)

        # --- encoder; names follow the official state-dict layout ("32x32_block0", ...)
        self.enc, self._enc_kind = nn.ModuleDict(), []
        skips, cout, caux = [], in_channels, in_channels

        def enc(name: str, kind: str, layer: nn.Module, skip: bool) -> None:
            self.enc[name] = layer
            self._enc_kind.append(kind)
            if skip:
                skips.append(layer.cout)

        for level, mult in enumerate(channel_mult):
            res = image_size >> level
            if level == 0:
                enc(f"{res}x{res}_conv", "conv", Conv2d(cout, model_channels, 3), skip=True)
                cout = model_channels
            else:
                enc(f"{res}x{res}_down", "block", UNetBlock(cout, cout, resample="down", attention=False, **block), True)
                if encoder_type == "skip":  # the input image, downsampled, projected into every level
                    enc(f"{res}x{res}_aux_down", "aux_down", Conv2d(caux, caux, 0, resample="down", taps=taps), False)
                    enc(f"{res}x{res}_aux_skip", "aux_skip", Conv2d(caux, cout, 1), False)
                if encoder_type == "residual":  # a strided conv path from the previous level, averaged in
                    enc(f"{res}x{res}_aux_residual", "aux_residual",
                        Conv2d(caux, cout, 3, resample="down", taps=taps, fused=True), False)
                    caux = cout
            for i in range(num_blocks):
                layer = UNetBlock(cout, model_channels * mult, resample=None, attention=res in attn_resolutions, **block)
                enc(f"{res}x{res}_block{i}", "block", layer, True)
                cout = layer.cout

        # --- decoder
        self.dec, self._dec_kind = nn.ModuleDict(), []

        def dec(name: str, kind: str, layer: nn.Module) -> None:
            self.dec[name] = layer
            self._dec_kind.append(kind)

        for level, mult in reversed(list(enumerate(channel_mult))):
            res = image_size >> level
            if level == levels - 1:  # the middle: attention always, whatever attn_resolutions says
                dec(f"{res}x{res}_in0", "block", UNetBlock(cout, cout, resample=None, attention=True, **block))
                dec(f"{res}x{res}_in1", "block", UNetBlock(cout, cout, resample=None, attention=False, **block))
            else:
                dec(f"{res}x{res}_up", "block", UNetBlock(cout, cout, resample="up", attention=False, **block))
            for i in range(num_blocks + 1):
                attn = i == num_blocks and res in attn_resolutions
                layer = UNetBlock(cout + skips.pop(), model_channels * mult, resample=None, attention=attn, **block)
                dec(f"{res}x{res}_block{i}", "cat", layer)
                cout = layer.cout
            if decoder_type == "skip" or level == 0:  # an image-space output at this level (skip: summed up)
                if decoder_type == "skip" and level < levels - 1:
                    dec(f"{res}x{res}_aux_up", "aux_up", Conv2d(in_channels, in_channels, 0, resample="up", taps=taps))
                dec(f"{res}x{res}_aux_norm", "aux_norm", group_norm(cout))
                dec(f"{res}x{res}_aux_conv", "aux_conv", Conv2d(cout, in_channels, 3, gain=1e-5))
        self.set_attention(attention)

    def set_attention(self, mode: str) -> None:
        """'fused': torch SDPA (flash / memory-efficient kernels); 'math': explicit softmax. Both support
        torch.func.jvp when SDPA runs its math backend (MeanFlow's JVP selects it)."""
        if mode not in ("fused", "math"):
            raise OptionError("attention", f"attention must be 'fused' or 'math', got {mode!r}")
        for m in self.modules():
            if isinstance(m, UNetBlock):
                m.fused_attn = mode == "fused"

    def embed(self, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The mapping network: the (B, emb) vector every block adds."""
        dtype = self.map_layer0.weight.dtype
        emb = torch.cat([self.map_noise(t), self.map_gap(t - s)], dim=1).to(dtype)  # (B, 2 noise)
        if self.map_label is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            onehot = F.one_hot(y, self.num_classes + 1)[:, :self.num_classes]  # the null class: all zeros
            emb = emb + self.map_label(onehot.to(dtype) * math.sqrt(self.num_classes))
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError(f"unet: augment_labels of shape {tuple(augment_labels.shape)} given, but the "
                                 "backbone has augment_dim = 0; set backbone.augment_dim to their width")
            if augment_labels.shape != (t.shape[0], self.augment_dim):
                raise ValueError(f"unet: augment_labels must be (B, {self.augment_dim}) = {(t.shape[0], self.augment_dim)}, "
                                 f"got {tuple(augment_labels.shape)}; backbone.augment_dim must match the data's labels")
            emb = emb + self.map_augment(augment_labels.to(dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))  # (B, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        assert t.shape == (b,) and s.shape == (b,), f"t and s must be (B,), got {tuple(t.shape)}, {tuple(s.shape)}"
        emb = self.embed(t, s, y, augment_labels)  # (B, E)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        skips, aux = [], x  # encoder outputs; aux: the image-space path of the skip / residual encoders
        for kind, layer in zip(self._enc_kind, self.enc.values()):
            if kind == "aux_down":
                aux = layer(aux)
            elif kind == "aux_skip":
                x = skips[-1] = x + layer(aux)
            elif kind == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) * SKIP_SCALE
            else:
                x = layer(x) if kind == "conv" else layer(x, emb)  # (B, C_level, res, res)
                skips.append(x)

        out = h = None  # out: the image-space output, summed over levels by the skip decoder
        for kind, layer in zip(self._dec_kind, self.dec.values()):
            if kind == "aux_up":
                out = layer(out)
            elif kind == "aux_norm":
                h = layer(x)
            elif kind == "aux_conv":
                h = layer(F.silu(h))  # (B, C_in, res, res)
                out = h if out is None else out + h
            elif kind == "cat":
                x = layer(torch.cat([x, skips.pop()], dim=1), emb)
            else:
                x = layer(x, emb)
        return out.contiguous() if self.channels_last else out  # (B, C, H, W)


def check_options(image_size: int, model_channels: int, channel_mult: list[int], channel_mult_noise: int,
                  attn_resolutions: list[int], resample_filter: list[int], embedding_type: str,
                  encoder_type: str, decoder_type: str) -> None:
    """Constraints between options and the data, each an OptionError naming the key and what to do
    (GroupNorm widths are checked where the norms are made, layers.group_norm)."""
    levels = len(channel_mult)
    if levels == 0:
        raise OptionError("channel_mult", "channel_mult is empty; give one multiplier per resolution, e.g. [2, 2, 2]")
    if image_size % 2 ** (levels - 1):
        raise OptionError("channel_mult", f"unet: image size {image_size} is not divisible by 2^{levels - 1} = "
                          f"{2 ** (levels - 1)} ({levels} resolutions from channel_mult = {channel_mult}); "
                          "use fewer entries in channel_mult")
    resolutions = [image_size >> level for level in range(levels)]
    for r in attn_resolutions:
        if r not in resolutions:
            raise OptionError("attn_resolutions", f"unet: attention resolution {r} is not one of this U-Net's "
                              f"resolutions {resolutions} (image size {image_size}, channel_mult = {channel_mult}); set "
                              "attn_resolutions to some of them, or to [] (the middle block always attends)")
    if (model_channels * channel_mult_noise) % 2:
        raise OptionError("channel_mult_noise", f"unet: model_channels x channel_mult_noise = "
                          f"{model_channels * channel_mult_noise} must be even (sine and cosine halves)")
    if len(resample_filter) % 2 or sum(resample_filter) <= 0:
        raise OptionError("resample_filter", f"unet: resample_filter {resample_filter} must have an even number of "
                          "taps with a positive sum, e.g. [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++)")
    for key, value, allowed in (("embedding_type", embedding_type, ("positional", "fourier")),
                                ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                ("decoder_type", decoder_type, ("standard", "skip"))):
        if value not in allowed:
            raise OptionError(key, f"unet: {key} must be one of {list(allowed)}, got {value!r}")
