"""imfDiT: the improved-MeanFlow transformer with in-context conditioning (Lyy-iiis/imeanflow models/imfDiT.py).

Written for fewstep from the official definitions (files and lines in docs/objectives/imf.md):

    sequence = [class tokens | omega tokens | t_min tokens | t_max tokens | gap tokens | patch tokens]
    each prefix group = learnable (n, D) tokens + the group's condition embedding (broadcast over the group)
    block     x += attn(RMSNorm x) * g_attn;  x += SwiGLU(RMSNorm x) * g_mlp   (g: per-channel, zero-init)
    attention bias-free q, k, v, o; per-head RMSNorm on q and k; 1-D RoPE over the whole sequence; fp32 softmax
    heads     shared trunk (depth - aux_head_depth blocks), then a u-head and a v-head (aux_head_depth blocks each),
              each with its own final layer (RMSNorm, zero-init Linear); prefix tokens dropped before unpatchify

No adaLN. The network does not see t, only the gap h = t - s (official comment: "We don't explicitly condition on
time t, only on h = t - r"). Guidance enters as the extra conditions `omega` (embedded as 1 - 1/omega), `t_min` and
`t_max` (raw); a missing one means "no guidance": omega = 1, interval [0, 1].
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# name -> (depth, hidden, heads, aux_head_depth); official sizes models/imfDiT.py (B/2, M/2, L/2, XL/2)
SIZES = {
    "T": (4, 128, 4, 2),  # CPU quickstarts and tests
    "S": (12, 384, 6, 4),
    "B": (12, 768, 12, 8),
    "M": (24, 768, 12, 8),
    "L": (32, 1024, 16, 8),
    "XL": (48, 1024, 16, 8),
}


def parse_size(size: str) -> tuple[int, int, int, int, int]:
    m = re.fullmatch(r"([A-Z]+)/(\d+)", size)
    if not m or m.group(1) not in SIZES:
        raise ValueError(f"unknown imfdit size {size!r}; sizes are NAME/PATCH with NAME in {', '.join(SIZES)} (e.g. 'B/2')")
    return (*SIZES[m.group(1)], int(m.group(2)))


def scaled_linear(fan_in: int, fan_out: int, bias: bool, constant: float) -> nn.Linear:
    """Linear with weights N(0, constant^2 / fan_in) and zero bias (official TorchLinear 'scaled_variance')."""
    lin = nn.Linear(fan_in, fan_out, bias=bias)
    nn.init.normal_(lin.weight, std=constant / math.sqrt(fan_in))
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, weight initialised to 1 (eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, head_dim/2): angle(pos, i) = pos theta^(-2i/head_dim), positions 0..seq_len-1."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs (x[2i], x[2i+1]) of x (B, N, H, hd) by the position's angle (a linear map)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xr = x.to(ct).reshape(*x.shape[:-1], -1, 2)
    c, s = cos.to(ct)[None, :, None, :], sin.to(ct)[None, :, None, :]
    a, b = xr[..., 0], xr[..., 1]
    return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, init: float, fused: bool):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (scaled_linear(hidden, hidden, False, init)
                                                                for _ in range(4))
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.fused = fused

    def qkv(self, x, cos, sin):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, hd)

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:  # explicit, softmax in float32 at least (official: "manually implement attention to match JAX")
            p = ((q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)).softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32))
            o = p.to(v.dtype) @ v
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free."""

    def __init__(self, hidden: int, inner: int, init: float):
        super().__init__()
        self.w1 = scaled_linear(hidden, inner, False, init)
        self.w3 = scaled_linear(hidden, inner, False, init)
        self.w2 = scaled_linear(inner, hidden, False, init)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, init: float, fused: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.attn = Attention(hidden, heads, init, fused)
        self.mlp = SwiGLU(hidden, int(hidden * mlp_ratio), init)
        self.attn_scale = nn.Parameter(torch.zeros(hidden))  # zero-init residual gates: each block starts as identity
        self.mlp_scale = nn.Parameter(torch.zeros(hidden))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale
        return x + self.mlp(self.norm2(x)) * self.mlp_scale


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.linear = nn.Linear(hidden, out)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(self.norm(x))


class ScalarEmbedder(nn.Module):
    """Sinusoid of a raw scalar (cos half, then sin; max period 1e4; 256 features) -> Linear, SiLU, Linear."""

    def __init__(self, hidden: int, init: float, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(scaled_linear(freq_dim, hidden, True, init), nn.SiLU(),
                                 scaled_linear(hidden, hidden, True, init))

    def freqs(self, like: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        ct = torch.promote_types(like.dtype, torch.float32)
        return torch.exp(-math.log(10000.0) * torch.arange(half, device=like.device, dtype=ct) / half)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        f = self.freqs(t)
        arg = t.to(f.dtype)[:, None] * f[None]
        return torch.cat([arg.cos(), arg.sin()], -1).to(self.mlp[0].weight.dtype)

    def forward(self, t):
        return self.mlp(self.features(t))


class IMFDiT(nn.Module):
    """net(x, t, s, y, omega=, t_min=, t_max=) -> u(x, h = t - s) (B, C, H, W); forward_uv also returns the v-head."""

    #: extra per-row conditions (Batch.cond / objective / sampler keywords): the guidance scale and interval
    conditions = ("omega", "t_min", "t_max")

    def __init__(self, in_channels: int, image_size: int, num_classes: int, *, size: str, depth: int, hidden: int,
                 heads: int, aux_head_depth: int, mlp_ratio: float, class_tokens: int, cfg_tokens: int,
                 interval_tokens: int, time_tokens: int, weight_init: float, token_init: float, embed_init: float,
                 rope_theta: float, attention: str):
        super().__init__()
        d0, h0, n0, a0, patch = parse_size(size)
        self.depth, self.hidden, self.heads = depth or d0, hidden or h0, heads or n0
        self.aux_head_depth = a0 if aux_head_depth < 0 else aux_head_depth
        if self.aux_head_depth > self.depth:
            raise ValueError(f"aux_head_depth {self.aux_head_depth} exceeds depth {self.depth}")
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch} (size {size!r})")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} must give an even head width (RoPE pairs)")
        if attention not in ("fused", "math"):
            raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
        self.in_channels, self.num_classes, self.patch = in_channels, num_classes, patch
        D = self.hidden
        self.x_embedder = nn.Conv2d(in_channels, D, patch, patch)
        fan_in, fan_out = patch * patch * in_channels, D
        lim = math.sqrt(6.0 / (fan_in + fan_out))  # initialised like a Linear (xavier-uniform bound), zero bias
        nn.init.uniform_(self.x_embedder.weight, -lim, lim)
        nn.init.zeros_(self.x_embedder.bias)
        self.h_embedder = ScalarEmbedder(D, embed_init)
        self.omega_embedder = ScalarEmbedder(D, embed_init)
        self.t_min_embedder = ScalarEmbedder(D, embed_init)
        self.t_max_embedder = ScalarEmbedder(D, embed_init)
        self.y_embedder = nn.Embedding(num_classes + 1, D)  # row num_classes = null class
        nn.init.normal_(self.y_embedder.weight, std=embed_init / math.sqrt(D))

        def tokens(n):
            return nn.Parameter(torch.randn(n, D) * (token_init / math.sqrt(D)))

        self.class_tokens, self.omega_tokens = tokens(class_tokens), tokens(cfg_tokens)
        self.t_min_tokens, self.t_max_tokens = tokens(interval_tokens), tokens(interval_tokens)
        self.time_tokens = tokens(time_tokens)
        self.prefix = class_tokens + cfg_tokens + 2 * interval_tokens + time_tokens
        num_patches = (image_size // patch) ** 2
        cos, sin = rope_tables(D // self.heads, self.prefix + num_patches, rope_theta)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        fused = attention == "fused"
        mk = lambda: Block(D, self.heads, mlp_ratio, weight_init, fused)  # noqa: E731
        self.shared_blocks = nn.ModuleList(mk() for _ in range(self.depth - self.aux_head_depth))
        self.u_heads = nn.ModuleList(mk() for _ in range(self.aux_head_depth))
        self.v_heads = nn.ModuleList(mk() for _ in range(self.aux_head_depth))
        out = patch * patch * in_channels
        self.u_final_layer = FinalLayer(D, out)
        self.v_final_layer = FinalLayer(D, out) if self.aux_head_depth > 0 else None

    @property
    def has_v_head(self) -> bool:
        return self.v_final_layer is not None

    def set_attention(self, mode: str) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = mode == "fused"

    # -- pieces ------------------------------------------------------------------------------------
    def guidance_inputs(self, x, omega, t_min, t_max):
        b = x.shape[0]
        dt = x.dtype if x.is_floating_point() else torch.float32
        one = lambda v, d: torch.full((b,), d, dtype=dt, device=x.device) if v is None else v.to(dt)  # noqa: E731
        return one(omega, 1.0), one(t_min, 0.0), one(t_max, 1.0)

    def rope(self, dtype):
        ct = torch.promote_types(dtype, torch.float32)
        if ct == torch.float64:  # float64 tests: exact tables
            cos, sin = rope_tables(self.hidden // self.heads, self.rope_cos.shape[0])
            return cos.to(self.rope_cos.device), sin.to(self.rope_cos.device)
        return self.rope_cos, self.rope_sin

    def sequence(self, x, t, s, y, omega, t_min, t_max):
        b = x.shape[0]
        if y is None:
            y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
        omega, t_min, t_max = self.guidance_inputs(x, omega, t_min, t_max)
        patches = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, N, D)
        groups = [
            self.class_tokens + self.y_embedder(y)[:, None],
            self.omega_tokens + self.omega_embedder(1 - 1 / omega)[:, None],
            self.t_min_tokens + self.t_min_embedder(t_min)[:, None],
            self.t_max_tokens + self.t_max_embedder(t_max)[:, None],
            self.time_tokens + self.h_embedder(t - s)[:, None],  # the gap only: t itself is not an input
        ]
        return torch.cat(groups + [patches], 1)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        p, c, g = self.patch, self.in_channels, int(round(n ** 0.5))
        return torch.einsum("bhwpqc->bchpwq", tokens.reshape(b, g, g, p, p, c)).reshape(b, c, g * p, g * p)

    def head(self, seq, blocks, final, cos, sin):
        for blk in blocks:
            seq = blk(seq, cos, sin)
        return self.unpatchify(final(seq[:, self.prefix:]))

    def trunk(self, x, t, s, y, omega, t_min, t_max):
        cos, sin = self.rope(x.dtype)
        seq = self.sequence(x, t, s, y, omega, t_min, t_max)
        for blk in self.shared_blocks:
            seq = blk(seq, cos, sin)
        return seq, cos, sin

    # -- the backbone contract ----------------------------------------------------------------------
    def forward(self, x, t, s, y=None, omega=None, t_min=None, t_max=None):
        """u (the average velocity over [s, t]), the head used for sampling."""
        seq, cos, sin = self.trunk(x, t, s, y, omega, t_min, t_max)
        return self.head(seq, self.u_heads, self.u_final_layer, cos, sin)

    def forward_uv(self, x, t, s, y=None, omega=None, t_min=None, t_max=None):
        """(u, v): both heads on one shared trunk pass (training)."""
        if not self.has_v_head:
            raise ValueError("this imfdit has no v-head (aux_head_depth = 0)")
        seq, cos, sin = self.trunk(x, t, s, y, omega, t_min, t_max)
        return (self.head(seq, self.u_heads, self.u_final_layer, cos, sin),
                self.head(seq, self.v_heads, self.v_final_layer, cos, sin))

    def forward_v(self, x, t, s, y=None, omega=None, t_min=None, t_max=None):
        """The auxiliary v-head alone (the guidance and tangent passes)."""
        if not self.has_v_head:
            raise ValueError("this imfdit has no v-head (aux_head_depth = 0)")
        seq, cos, sin = self.trunk(x, t, s, y, omega, t_min, t_max)
        return self.head(seq, self.v_heads, self.v_final_layer, cos, sin)

    def forward_jvp(self, x, t, s, y, dx, dt, ds, omega=None, t_min=None, t_max=None):
        """(u, du) along (dx, dt, ds) in one pass without forward-mode AD (jvp.py); the guidance inputs are held fixed."""
        from .jvp import imfdit_jvp

        return imfdit_jvp(self, x, t, s, y, dx, dt, ds, omega, t_min, t_max)


def build(ctx, *, size: str, depth: int, hidden: int, heads: int, aux_head_depth: int, mlp_ratio: float,
          class_tokens: int, cfg_tokens: int, interval_tokens: int, time_tokens: int, weight_init: float,
          token_init: float, embed_init: float, rope_theta: float, attention: str) -> IMFDiT:
    spec = ctx.data
    if spec is None or len(spec.shape) != 3 or spec.shape[1] != spec.shape[2]:
        raise ValueError(f"imfdit needs square image-shaped (C, H, W) data, got {spec.shape if spec else None}")
    c, h, _ = spec.shape
    return IMFDiT(c, h, spec.num_classes, size=size, depth=depth, hidden=hidden, heads=heads,
                  aux_head_depth=aux_head_depth, mlp_ratio=mlp_ratio, class_tokens=class_tokens, cfg_tokens=cfg_tokens,
                  interval_tokens=interval_tokens, time_tokens=time_tokens, weight_init=weight_init,
                  token_init=token_init, embed_init=embed_init, rope_theta=rope_theta, attention=attention)
