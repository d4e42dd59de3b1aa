"""Forward-mode derivative of the DiT written out layer by layer: (out, d out) of net(x, t, s, y) along (dx, dt, ds).

Why by hand: torch's forward-mode AD has no rule for any fused attention kernel, so torch.func.jvp
must run attention through the math path, and it pays forward AD's per-op overhead everywhere
(on an H200, DiT-B/2, 64 rows, bf16: 85-101 ms, more than the flow-matching forward of 256 rows).
Here the primal is the module's own computation, op for op (the fused SDPA kernel included), so
`out` equals `net(x, t, s, y)`; every tangent is the closed-form derivative of its layer:

    linear / conv     d(W a + b)            = W da
    layer norm        d((a - mu) / sigma)   = (da - mean(da) - n mean(n da)) / sigma,  n the output
    adaLN modulate    d(n (1 + sc) + sh)    = dn (1 + sc) + n dsc + dsh
    SiLU, GELU(tanh)  d act(a)              = act'(a) da
    attention         S = q k^T / sqrt(d), P = softmax(S), O = P v:
                      dS = (dq k^T + q dk^T) / sqrt(d),  dP = P * (dS - rowsum(P * dS)),  dO = dP v + P dv
    timestep features d[cos(f t), sin(f t)] = [-f sin(f t), f cos(f t)] dt

Tangents are computed without autograd (`d out` carries no gradient: MeanFlow stops it); the primal
keeps its graph when grad mode is on, so one call gives u with gradient and du/dt beside it.
Tested against torch.func.jvp in float64 (tests/test_dit_jvp.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _linear(m: nn.Linear, a, da):
    out = m(a)
    with torch.no_grad():
        return out, F.linear(da, m.weight)


def _silu(a, da):
    out = F.silu(a)
    with torch.no_grad():
        s = torch.sigmoid(a)
        return out, da * (s * (1 + a * (1 - s)))


def _gelu_tanh(a, da):
    out = F.gelu(a, approximate="tanh")
    with torch.no_grad():
        k = math.sqrt(2 / math.pi)
        th = torch.tanh(k * (a + 0.044715 * a.pow(3)))
        return out, da * (0.5 * (1 + th) + 0.5 * a * (1 - th * th) * k * (1 + 3 * 0.044715 * a * a))


def _layer_norm(m: nn.LayerNorm, a, da):
    """LayerNorm without affine (DiT's norms); statistics in float32 at least, as autocast runs layer_norm."""
    out = m(a)
    with torch.no_grad():
        ct = torch.promote_types(a.dtype, torch.float32)
        a32, da32 = a.to(ct), da.to(ct)
        var = a32.var(-1, unbiased=False, keepdim=True)
        n = (a32 - a32.mean(-1, keepdim=True)) * torch.rsqrt(var + m.eps)
        dn = (da32 - da32.mean(-1, keepdim=True) - n * (n * da32).mean(-1, keepdim=True)) * torch.rsqrt(var + m.eps)
        return out, dn.to(out.dtype)


def _modulate(n, dn, sh, dsh, sc, dsc):
    out = n * (1 + sc.unsqueeze(1)) + sh.unsqueeze(1)
    with torch.no_grad():
        return out, dn * (1 + sc.unsqueeze(1)) + n * dsc.unsqueeze(1) + dsh.unsqueeze(1)


def _check_deterministic(module: nn.Module) -> None:
    if module.training:
        for m in module.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                raise ValueError("DiT.forward_jvp needs a deterministic module: dropout is active in training mode "
                                 "(call it in eval mode, or use torch.func.jvp, which replays the dropout masks)")


def attention_tangent(q, k, v, dq, dk, dv, scale: float):
    """d softmax(q k^T scale) v along (dq, dk, dv), (B, H, N, hd) each, in closed form with P materialised:
    dS = (dq k^T + q dk^T) scale, dP = P * (dS - rowsum(P * dS)), dO = dP v + P dv. No gradient."""
    with torch.no_grad():
        p = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N); float32 under autocast
        ds = (torch.cat([dq, q], -1) * scale) @ torch.cat([k, dk], -1).transpose(-2, -1)  # dq k^T + q dk^T
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))
        return dp @ v + p @ dv


def _attention(attn, a, da):
    """timm Attention (qkv bias, no q/k norm, no gate) with its tangent."""
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
            and isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) and getattr(attn, "gate", None) is None):
        raise ValueError("DiT.forward_jvp supports timm Attention without q/k norm, scale norm or gate")
    b, n, _ = a.shape
    h, hd = attn.num_heads, attn.head_dim
    qkv, dqkv = _linear(attn.qkv, a, da)
    q, k, v = qkv.reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    with torch.no_grad():
        dq, dk, dv = dqkv.reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        do = attention_tangent(q, k, v, dq, dk, dv, attn.scale)
    o = o.transpose(1, 2).reshape(b, n, -1)
    do = do.transpose(1, 2).reshape(b, n, -1)
    return _linear(attn.proj, o, do)


def _mlp(mlp, a, da):
    if not (isinstance(mlp.norm, nn.Identity) and isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "tanh"):
        raise ValueError("DiT.forward_jvp supports timm Mlp with GELU(tanh) and no hidden norm")
    a, da = _linear(mlp.fc1, a, da)
    a, da = _gelu_tanh(a, da)
    return _linear(mlp.fc2, a, da)


def _timestep(emb, t, dt):
    f = emb.features(t, emb.freq_dim)
    with torch.no_grad():
        half = emb.freq_dim // 2
        ct = torch.promote_types(t.dtype, torch.float32)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=ct) / half)
        arg = t.to(ct)[:, None] * freqs[None]
        df = torch.cat([-torch.sin(arg), torch.cos(arg)], -1) * torch.cat([freqs, freqs])[None] * dt.to(ct)[:, None]
    wdt = emb.mlp[0].weight.dtype
    a, da = _linear(emb.mlp[0], f.to(wdt), df.to(wdt))
    a, da = _silu(a, da)
    return _linear(emb.mlp[2], a, da)


def _gated_branch(norm, branch, x, dx, sh, dsh, sc, dsc, g, dg):
    """x + g * branch(modulate(norm(x), sh, sc)) and its tangent (product rule on the gate)."""
    n, dn = _layer_norm(norm, x, dx)
    n, dn = _modulate(n, dn, sh, dsh, sc, dsc)
    o, do = branch(n, dn)
    x_new = x + g.unsqueeze(1) * o
    with torch.no_grad():
        dx = dx + dg.unsqueeze(1) * o + g.unsqueeze(1) * do
    return x_new, dx


def _block(blk, x, dx, c, dc):
    a, da = _silu(c, dc)
    mod, dmod = _linear(blk.adaLN_modulation[1], a, da)
    sh_a, sc_a, g_a, sh_m, sc_m, g_m = mod.chunk(6, dim=1)
    dsh_a, dsc_a, dg_a, dsh_m, dsc_m, dg_m = dmod.chunk(6, dim=1)
    x, dx = _gated_branch(blk.norm1, lambda n, dn: _attention(blk.attn, n, dn), x, dx, sh_a, dsh_a, sc_a, dsc_a, g_a, dg_a)
    return _gated_branch(blk.norm2, lambda n, dn: _mlp(blk.mlp, n, dn), x, dx, sh_m, dsh_m, sc_m, dsc_m, g_m, dg_m)


def dit_jvp(net, x, t, s, y, dx, dt, ds):
    """(net(x, t, s, y), d/de net(x + e dx, t + e dt, s + e ds, y) at e = 0); the tangent without gradient."""
    _check_deterministic(net)
    b = x.shape[0]
    if y is None:
        y = torch.full((b,), net.num_classes, dtype=torch.long, device=x.device)
    pe = net.x_embedder
    if not (isinstance(pe.norm, nn.Identity) and pe.flatten and not getattr(pe, "dynamic_img_pad", False)):
        raise ValueError("DiT.forward_jvp supports timm PatchEmbed with flatten and no norm or padding")
    h = pe(x) + net.pos_embed
    with torch.no_grad():
        dh = F.conv2d(dx, pe.proj.weight, None, pe.proj.stride, pe.proj.padding).flatten(2).transpose(1, 2)
    ct, dct = _timestep(net.t_embedder, t, dt)
    cs, dcs = _timestep(net.s_embedder, t - s, dt - ds)
    c = ct + cs + net.y_embedder(y)
    dc = dct + dcs
    for blk in net.blocks:
        h, dh = _block(blk, h, dh, c, dc)
    fl = net.final_layer
    a, da = _silu(c, dc)
    mod, dmod = _linear(fl.adaLN_modulation[1], a, da)
    (shift, scale), (dshift, dscale) = mod.chunk(2, dim=1), dmod.chunk(2, dim=1)
    n, dn = _layer_norm(fl.norm, h, dh)
    n, dn = _modulate(n, dn, shift, dshift, scale, dscale)
    o, do = _linear(fl.linear, n, dn)
    with torch.no_grad():
        do = net.unpatchify(do)
    return net.unpatchify(o), do
