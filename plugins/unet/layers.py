"""The layers of the DDPM++ / NCSN++ U-Net: time features, FIR resampling convolutions, the residual block.

Written for fewstep from the descriptions in Song et al. 2021 (score SDE, appendix H: DDPM++ and
NCSN++) and Karras et al. 2022 (EDM, appendix F.2 and Table 7), with the facts the papers leave
open (init gains, GroupNorm groups, where dropout sits) read from NVlabs/edm training/networks.py;
docs/backbones.md lists each fact with its official file and line. Parameter and buffer names follow
that file's state-dict layout (`conv0`, `affine`, `qkv`, `resample_filter`, ...), so an official
SongUNet state dict loads with `load_state_dict`.

Everything here is plain tensor ops with forward-mode AD (torch.func.jvp works through it) and no
custom autograd.Function; attention goes through torch SDPA or an explicit softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.api import OptionError

SKIP_SCALE = math.sqrt(0.5)  # every residual sum is scaled by 1/sqrt(2) (DDPM++'s skip_rescale)


# --- time features ----------------------------------------------------------------------------------

class PositionalEmbedding(nn.Module):
    """DDPM++'s sinusoidal features of a scalar: [sin(t w_i) | cos(t w_i)], w_i = 1e4^(-i / (n/2 - 1)).

    The frequencies run from 1 down to exactly 1e-4 (the last index reaches the end point). The sine
    half comes first (the DDPM++ order). No parameters.
    """

    def __init__(self, num_channels: int, max_positions: float = 10000.0):
        super().__init__()
        assert num_channels % 2 == 0 and num_channels >= 4, f"need an even width >= 4, got {num_channels}"
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        dt = torch.promote_types(t.dtype, torch.float32)  # float64 inputs stay float64 (finite differences)
        freqs = self.max_positions ** (-torch.arange(half, device=t.device, dtype=dt) / (half - 1))  # (n/2,)
        args = t.to(dt)[:, None] * freqs[None]  # (B, n/2)
        return torch.cat([args.sin(), args.cos()], dim=1)  # (B, n)


class FourierEmbedding(nn.Module):
    """NCSN++'s random Fourier features: [sin(2 pi t f_i) | cos(2 pi t f_i)], f_i ~ N(0, scale^2), fixed."""

    def __init__(self, num_channels: int, scale: float):
        super().__init__()
        assert num_channels % 2 == 0, f"need an even width, got {num_channels}"
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(t.dtype, self.freqs.dtype)
        args = t.to(dt)[:, None] * (2 * math.pi * self.freqs.to(dt))[None]  # (B, n/2)
        return torch.cat([args.sin(), args.cos()], dim=1)  # (B, n)


# --- resampling and convolution -----------------------------------------------------------------------

def fir_kernel(taps: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A separable 2-D FIR kernel from 1-D taps, normalised to sum 1: (1, 1, k, k)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


def is_box(taps: list[int] | tuple[int, ...]) -> bool:
    """[a, a]: the box filter, i.e. 2x2 average pooling / nearest-neighbour upsampling."""
    return len(taps) == 2 and taps[0] == taps[1]


def fir_resample(x: torch.Tensor, kernel: torch.Tensor, mode: str, padding: int | None = None,
                 box: bool = False) -> torch.Tensor:
    """2x down- or upsampling of every channel with the FIR `kernel` (1, 1, k, k), k even.

    down: x filtered and kept at even positions; up: zeros inserted, then filtered with 4 x kernel
    (a transposed convolution), which keeps the mean. padding None: (k - 1) // 2, which maps H to
    H / 2 or 2 H. box=True (the kernel is [1, 1]): the same result through average pooling /
    nearest-neighbour upsampling, which are faster.
    """
    c, k = x.shape[1], kernel.shape[-1]
    pad = (k - 1) // 2 if padding is None else padding
    if box and pad == 0:
        return F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
    w = kernel.to(x.dtype).expand(c, 1, k, k)
    if mode == "down":
        return F.conv2d(x, w, stride=2, padding=pad, groups=c)
    return F.conv_transpose2d(x, w * 4, stride=2, padding=pad, groups=c)


class Conv2d(nn.Module):
    """A k x k convolution ('same' padding) with an optional 2x FIR resampling in front of it.

    kernel 0: resampling only, no weights. fused (down only, NCSN++'s residual encoder path): the
    convolution runs at full resolution with (k - 1) // 2 extra padding and the FIR downsampling
    follows without padding. Weights are xavier-uniform times `gain` (gain 1e-5: the near-zero init of
    the last layer of every residual branch), biases zero.
    """

    def __init__(self, cin: int, cout: int, kernel: int, *, resample: str | None = None,
                 taps: list[int] | tuple[int, ...] = (1, 1), fused: bool = False, gain: float = 1.0):
        super().__init__()
        assert resample in (None, "up", "down"), resample
        assert not fused or (resample == "down" and kernel), "only a down-sampling convolution can be fused"
        self.cin, self.cout, self.kernel, self.resample, self.fused = cin, cout, kernel, resample, fused
        self.box = is_box(taps)
        if kernel:
            self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
            self.bias = nn.Parameter(torch.zeros(cout))
            nn.init.xavier_uniform_(self.weight, gain=gain)  # fan_in = cin k^2, fan_out = cout k^2
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("resample_filter", fir_kernel(taps) if resample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter
        if self.fused:
            x = F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2 + (f.shape[-1] - 1) // 2)
            return fir_resample(x, f, "down", padding=0, box=self.box)
        if f is not None:
            x = fir_resample(x, f, self.resample, box=self.box)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2)
        return x


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, C / 4) groups (at least 4 channels a group) and eps 1e-6."""
    groups = min(32, channels // 4)
    if groups == 0 or channels % groups:
        raise OptionError("model_channels", f"unet: GroupNorm cannot split {channels} channels into min(32, C / 4) = "
                          f"{groups} groups; choose model_channels and channel_mult so that every width (and every "
                          "decoder concatenation of two widths) is a multiple of 32, or of 4 below 128")
    return nn.GroupNorm(groups, channels, eps=1e-6)


def linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


# --- the residual block -------------------------------------------------------------------------------

class UNetBlock(nn.Module):
    """DDPM++ residual block, optionally resampling and optionally followed by self-attention.

        h = conv0(silu(norm0(x)))                 # 3x3, after the up/down FIR when resampling
        h = conv1(dropout(silu(norm1(h + affine(emb)))))   # the embedding is added per channel
        x = (h + skip(x)) / sqrt(2)               # skip: 1x1 (+ FIR) when channels or size change
        x = (proj(attention(norm2(x))) + x) / sqrt(2)      # one head over all H*W positions

    conv1 and proj start near zero (gain 1e-5), qkv with gain sqrt(0.2).
    """

    def __init__(self, cin: int, cout: int, emb_channels: int, *, resample: str | None, attention: bool,
                 dropout: float, taps: list[int] | tuple[int, ...], heads: int = 1):
        super().__init__()
        self.cin, self.cout, self.heads = cin, cout, heads if attention else 0
        self.norm0 = group_norm(cin)
        self.conv0 = Conv2d(cin, cout, 3, resample=resample, taps=taps)
        self.affine = linear(emb_channels, cout)
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)  # a module, so has_active_dropout / RNG replay can see it
        self.conv1 = Conv2d(cout, cout, 3, gain=1e-5)
        self.skip = Conv2d(cin, cout, 1, resample=resample, taps=taps) if cin != cout or resample else None
        self.fused_attn = True
        if attention:
            assert cout % heads == 0, f"{cout} channels do not split into {heads} heads"
            self.norm2 = group_norm(cout)
            self.qkv = Conv2d(cout, 3 * cout, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(cout, cout, 1, gain=1e-5)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        n, d = self.heads, c // self.heads
        # qkv channels are ordered (head, channel, q/k/v), q/k/v fastest: the official layout
        qkv = self.qkv(x).reshape(b, n, d, 3, hh * ww)  # (B, n, d, 3, L)
        q, k, v = qkv.permute(3, 0, 1, 4, 2).unbind(0)  # 3 x (B, n, L, d)
        if self.fused_attn:
            a = F.scaled_dot_product_attention(q, k, v)  # (B, n, L, d)
        else:  # explicit softmax, in at least float32 (forward-mode AD on every build)
            dt = torch.promote_types(q.dtype, torch.float32)
            w = torch.einsum("bnqd,bnkd->bnqk", q.to(dt), k.to(dt)) / math.sqrt(d)  # (B, n, L, L)
            a = torch.einsum("bnqk,bnkd->bnqd", w.softmax(dim=-1).to(v.dtype), v)
        out = a.transpose(2, 3).reshape(b, c, hh, ww)  # channel = head * d + i; a view with channels-last strides
        # back to x's layout: otherwise every later activation (and the order dropout draws its masks in) silently
        # turns channels-last on a channels_last = false network
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))  # (B, cout, H', W')
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(self.dropout(h))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.heads:
            x = (self.proj(self.attend(self.norm2(x))) + x) * SKIP_SCALE
        return x
