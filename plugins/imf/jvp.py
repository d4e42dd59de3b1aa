"""Forward-mode derivative of imfDiT's u-head written out layer by layer: (u, du) along (dx, dt, ds).

The primal is the module's own computation (the fused attention kernel included); each tangent is the closed-form
derivative of its layer:

    linear (no bias)   d(W a)                 = W da
    RMSNorm            n = a r, r = (mean(a^2) + eps)^(-1/2):  dn = r da - a r^3 mean(a da), times the weight
    RoPE               a fixed rotation per position: d rope(a) = rope(da)
    attention          S = q k^T / sqrt(d), P = softmax(S), O = P v:
                       dS = (dq k^T + q dk^T) / sqrt(d),  dP = P * (dS - rowsum(P * dS)),  dO = dP v + P dv
    SwiGLU             d[silu(a1) a3]         = silu'(a1) da1 a3 + silu(a1) da3
    gated residual     d(x + o g)             = dx + do g          (g a parameter)
    gap embedder       d[cos(f h), sin(f h)]  = [-f sin(f h), f cos(f h)] dh,  dh = dt - ds

The guidance inputs (omega, t_min, t_max) and the label are held fixed (zero tangent), as in the official JVP, whose
tangents are (v_c, 1, 0) on (z, t, r) only. Tested against torch.func.jvp in float64 (tests/test_imf.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import apply_rope


def _silu(a, da):
    out = F.silu(a)
    with torch.no_grad():
        s = torch.sigmoid(a)
        return out, da * (s * (1 + a * (1 - s)))


def _linear(m, a, da):
    out = m(a)
    with torch.no_grad():
        return out, F.linear(da, m.weight)


def _rms(m, a, da):
    out = m(a)
    with torch.no_grad():
        ct = torch.promote_types(a.dtype, torch.float32)
        a32, da32 = a.to(ct), da.to(ct)
        r = torch.rsqrt(a32.pow(2).mean(-1, keepdim=True) + m.eps)
        dn = r * da32 - a32 * r.pow(3) * (a32 * da32).mean(-1, keepdim=True)
        return out, (dn * m.weight.to(ct)).to(out.dtype)


def _attention(attn, x, dx, cos, sin):
    b, n, d = x.shape
    H, hd = attn.heads, attn.head_dim

    def proj(lin, norm):
        a, da = _linear(lin, x, dx)
        a, da = a.view(b, n, H, hd), da.view(b, n, H, hd)
        if norm is not None:
            a, da = _rms(norm, a, da)
            a = apply_rope(a, cos, sin)
            with torch.no_grad():
                da = apply_rope(da, cos, sin)
        return a.transpose(1, 2), da.transpose(1, 2)

    q, dq = proj(attn.q_proj, attn.q_norm)
    k, dk = proj(attn.k_proj, attn.k_norm)
    v, dv = proj(attn.v_proj, None)
    scale = 1.0 / math.sqrt(hd)
    if attn.fused:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        p = ((q * scale) @ k.transpose(-2, -1)).softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32))
        o = p.to(v.dtype) @ v
    with torch.no_grad():
        ct = torch.promote_types(q.dtype, torch.float32)
        p = ((q * scale) @ k.transpose(-2, -1)).to(ct).softmax(-1)
        ds = ((dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale).to(ct)
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))
        do = (dp @ v.to(ct) + p @ dv.to(ct)).to(v.dtype)
    o, do = o.transpose(1, 2).reshape(b, n, d), do.transpose(1, 2).reshape(b, n, d)
    return _linear(attn.out_proj, o, do)


def _swiglu(mlp, x, dx):
    a1, da1 = _linear(mlp.w1, x, dx)
    a3, da3 = _linear(mlp.w3, x, dx)
    s1, ds1 = _silu(a1, da1)
    g = s1 * a3
    with torch.no_grad():
        dg = ds1 * a3 + s1 * da3
    return _linear(mlp.w2, g, dg)


def _block(blk, x, dx, cos, sin):
    n, dn = _rms(blk.norm1, x, dx)
    o, do = _attention(blk.attn, n, dn, cos, sin)
    x_new = x + o * blk.attn_scale
    with torch.no_grad():
        dx = dx + do * blk.attn_scale
    n, dn = _rms(blk.norm2, x_new, dx)
    o, do = _swiglu(blk.mlp, n, dn)
    out = x_new + o * blk.mlp_scale
    with torch.no_grad():
        dx = dx + do * blk.mlp_scale
    return out, dx


def _scalar_embed(emb, h, dh):
    f = emb.features(h)
    with torch.no_grad():
        fr = emb.freqs(h)
        arg = h.to(fr.dtype)[:, None] * fr[None]
        df = (torch.cat([-arg.sin(), arg.cos()], -1) * torch.cat([fr, fr])[None] * dh.to(fr.dtype)[:, None])
        df = df.to(f.dtype)
    a, da = _linear(emb.mlp[0], f, df)
    a, da = _silu(a, da)
    return _linear(emb.mlp[2], a, da)


def imfdit_jvp(net, x, t, s, y, dx, dt, ds, omega=None, t_min=None, t_max=None):
    """(u(x, t, s), d/de u(x + e dx, t + e dt, s + e ds) at e = 0); the tangent carries no gradient."""
    b = x.shape[0]
    cos, sin = net.rope(x.dtype)
    seq = net.sequence(x, t, s, y, omega, t_min, t_max)
    with torch.no_grad():
        dpatch = F.conv2d(dx, net.x_embedder.weight, None, net.patch).flatten(2).transpose(1, 2)
    _, dh_emb = _scalar_embed(net.h_embedder, t - s, dt - ds)
    with torch.no_grad():
        nt = net.time_tokens.shape[0]
        start = net.prefix - nt  # the gap tokens are the last prefix group
        dseq = torch.zeros_like(seq)
        dseq[:, start:net.prefix] = dh_emb.to(seq.dtype)[:, None]
        dseq[:, net.prefix:] = dpatch.to(seq.dtype)
    for blk in list(net.shared_blocks) + list(net.u_heads):
        seq, dseq = _block(blk, seq, dseq, cos, sin)
    fl = net.u_final_layer
    n, dn = _rms(fl.norm, seq[:, net.prefix:], dseq[:, net.prefix:])
    o, do = _linear(fl.linear, n, dn)
    with torch.no_grad():
        do = net.unpatchify(do)
    del b
    return net.unpatchify(o), do
