"""`mlp`: a residual MLP backbone net(x, t, s, y) for vector data (the GMM benchmark).

Conditioning as in the DiT: sinusoidal features of raw t and of the gap t - s, a label table with
a null row, summed into one vector that modulates every block (scale and shift, zero-initialised).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.mod = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h, c):
        shift, scale, gate = self.mod(c).chunk(3, dim=-1)
        z = self.norm(h) * (1 + scale) + shift
        return h + gate * self.fc2(nn.functional.silu(self.fc1(z)))


class MLP(nn.Module):
    def __init__(self, dim: int, num_classes: int, width: int, depth: int, freq_dim: int = 64):
        super().__init__()
        self.dim, self.num_classes, self.freq_dim = dim, num_classes, freq_dim
        self.inp = nn.Linear(dim, width)
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.gap_mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.y_emb = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, dim)
        # adaLN blocks carry the time information only with a non-zero gate; starting the gates at 0
        # (adaLN-Zero) and the output layer at 0 makes the initial network the zero function
        self.out_mod = nn.Linear(width, 2 * width)
        nn.init.zeros_(self.out_mod.weight)
        nn.init.zeros_(self.out_mod.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, s, y=None):
        b = x.shape[0]
        if y is None:
            y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
        dt = self.inp.weight.dtype
        c = (self.t_mlp(sinusoid(t, self.freq_dim).to(dt)) + self.gap_mlp(sinusoid(t - s, self.freq_dim).to(dt))
             + self.y_emb(y))
        c = nn.functional.silu(c)
        h = self.inp(x.reshape(b, -1))
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.out_mod(c).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift).view_as(x)


def build(ctx, *, width: int, depth: int) -> MLP:
    spec = ctx.data
    assert spec is not None, "mlp needs a data spec"
    return MLP(int(math.prod(spec.shape)), spec.num_classes, width, depth)
