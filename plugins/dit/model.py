"""DiT with two time inputs: net(x, t, s, y), adaLN-Zero conditioning on emb(t) + emb(t - s) + emb(y).

Written for fewstep from the DiT paper (Peebles & Xie, 2023) and the SoFlow /
MeanFlow DiTs (SoFlow dit.py:244-249, MeanFlow models/models_dit.py:208-219): raw t in [0, 1]
goes into the sinusoid (no x1000), the second embedder sees the gap t - s, the label table
has a null row (index num_classes) and label dropout happens in the objective,
never here. timm supplies Attention, Mlp and PatchEmbed.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from timm.layers import Attention, Mlp, PatchEmbed

# name -> (depth, hidden, heads); the patch size comes from the "/p" suffix of the size string.
WIDTHS = {
    "T": (4, 128, 4),  # CPU quickstarts
    "XS": (6, 192, 3),  # CPU tests / GMM-scale runs
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (16, 1024, 16),  # SoFlow/MeanFlow's M size
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def parse_size(size: str) -> tuple[int, int, int, int]:
    """'XL/2' -> (depth, hidden, heads, patch)."""
    m = re.fullmatch(r"([A-Z]+)/(\d+)", size)
    if not m or m.group(1) not in WIDTHS:
        raise ValueError(f"unknown DiT size {size!r}; sizes are NAME/PATCH with NAME in {', '.join(WIDTHS)} (e.g. 'B/2')")
    depth, hidden, heads = WIDTHS[m.group(1)]
    return depth, hidden, heads, int(m.group(2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(embed_dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, embed_dim), tokens in row-major order.

    Layout of the official SoFlow and MeanFlow DiTs (after DiT's get_2d_sincos_pos_embed, which meshes
    (grid_w, grid_h)): the first half of each vector encodes the token's COLUMN index, the second half
    its row index; each half is [sin(pos omega), cos(pos omega)] with omega_k = 1e4^(-k / (D/4)).
    Official checkpoints load only with this layout (docs/objectives/soflow.md, backbone).
    """
    assert embed_dim % 4 == 0, f"hidden size must be divisible by 4, got {embed_dim}"
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # gy: row index, gx: column index of each token
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (T, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (T, D/2)

    return torch.cat([one(gx), one(gy)], dim=1).float()  # (T, D): column half first


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a raw scalar in [0, 1] (cos then sin, max period 1e4) -> MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        dt = torch.promote_types(t.dtype, torch.float32)  # float64 inputs stay float64 (finite-difference tests)
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dt) / half)
        args = t.to(dt)[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"), drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + g_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_a, sc_a))  # (B, T, D)
        x = x + g_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh_m, sc_m))  # (B, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p*p*C)


class DiT(nn.Module):
    """net(x, t, s, y): x (B, C, H, W), t and s (B,) in [0, 1], y (B,) int64 or None (null class)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, *, size: str, depth: int, hidden: int,
                 heads: int, mlp_ratio: float, dropout: float, attention: str, gap_init: str):
        super().__init__()
        d0, h0, n0, patch = parse_size(size)
        self.depth, self.hidden, self.heads, self.patch = depth or d0, hidden or h0, heads or n0, patch
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch} (size {size!r})")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.x_embedder = PatchEmbed(image_size, patch, in_channels, self.hidden, bias=True)
        self.t_embedder = TimestepEmbedder(self.hidden)  # embeds t
        self.s_embedder = TimestepEmbedder(self.hidden)  # embeds the gap t - s (not s)
        self.y_embedder = nn.Embedding(num_classes + 1, self.hidden)  # row num_classes = null class
        grid = image_size // patch
        self.register_buffer("pos_embed", sincos_2d(self.hidden, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(self.hidden, self.heads, mlp_ratio, dropout) for _ in range(self.depth))
        self.final_layer = FinalLayer(self.hidden, patch, in_channels)
        self.set_attention(attention)
        if gap_init not in ("xavier", "normal"):
            raise ValueError(f"gap_init must be 'xavier' or 'normal', got {gap_init!r}")
        self.gap_init = gap_init
        self.initialize_weights()

    def set_attention(self, mode: str) -> None:
        """'fused': torch SDPA kernels (fast); 'math': explicit softmax (supports forward-mode AD)."""
        if mode not in ("fused", "math"):
            raise ValueError(f"attention must be 'fused' or 'math', got {mode!r}")
        for blk in self.blocks:
            blk.attn.fused_attn = mode == "fused"

    def initialize_weights(self) -> None:
        def xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patch embedding initialised like a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        # the t MLP is re-initialised N(0, 0.02) (DiT); the gap MLP keeps xavier in the official SoFlow DiT
        # (gap_init = "xavier") and gets N(0, 0.02) like t in the official MeanFlow DiT (gap_init = "normal")
        embedders = [self.t_embedder] + ([self.s_embedder] if self.gap_init == "normal" else [])
        for emb in embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        p, c = self.patch, self.in_channels
        g = int(n ** 0.5)
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)  # (B, C, H, W)

    def forward_jvp(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None,
                    dx: torch.Tensor, dt: torch.Tensor, ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(net(x, t, s, y), its derivative along (dx, dt, ds)) in one pass, without forward-mode AD (jvp.py).

        The output equals forward() and keeps its graph; the tangent carries no gradient. Needs a
        deterministic module (no active dropout). MeanFlow uses it for du/dt when the backbone has it.
        """
        from .jvp import dit_jvp

        return dit_jvp(self, x, t, s, y, dx, dt, ds)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        assert t.shape == (b,) and s.shape == (b,), f"t and s must be (B,), got {tuple(t.shape)}, {tuple(s.shape)}"
        if y is None:
            y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(y)  # (B, D)
        for blk in self.blocks:
            h = blk(h, c)  # (B, T, D)
        return self.unpatchify(self.final_layer(h, c))  # (B, C, H, W)
