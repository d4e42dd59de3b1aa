"""Exponential moving averages of the weights, one copy per decay.

Initialised as a copy of the weights at step 0, no warm-up (as both official codes do). Two update rules,
each the official one for its setting:

- every = 1 (ImageNet recipes; zlab-princeton/SoFlow train.py, the per-step EMA):
  e.mul_(d).add_(w, alpha=1 - d) in the shadow's float32.
- every = N > 1 (CIFAR recipes: 0.9999**16 every 16 steps; SoFlow train.py "CIFAR10 prefers a higher ema
  precision", py-meanflow models/ema.py update_ema_net): D = d**N, then e <- D e + (1 - D) w computed in
  float64 and stored back in float32. The updates follow finished steps k with k % N == offset: offset 0
  (steps N, 2N, ...: py-meanflow) or 1 (steps 1, N + 1, 2N + 1, ...: SoFlow train.py tests its step counter
  before incrementing it), `train.ema_offset`.

EDM's half-life EMA (`train.ema_halflife_kimg`, the sCT paper's CIFAR-10 EMA; NVlabs/edm training_loop.py,
"Update EMA"): at optimizer update k (1-based) with global batch B, cur_nimg = (k - 1) B images done before it,
h = min(1000 H, rampup * cur_nimg) (h = 1000 H without ramp-up), beta_k = 0.5 ** (B / max(h, 1e-8)) -- so the
first update copies the weights (beta = 0) and the half-life grows with the images seen until it reaches H.
These copies come first (copy 0 is the sampled one), before the constant `train.ema` decays. With every = N
they apply the product of the N betas of their steps, which is d**N for a constant decay.

Both run as fused `torch._foreach_*` updates over all tensors at once (a few kernels per copy, not two per
parameter), with the same operations in the same order as the per-parameter formulas above, so the result is
the same number (tests/test_loop_sync.py). `update(..., ok=flag)` takes a 0-dim bool tensor on the weights'
device: where it is False the copies stay exactly as they were (the decay becomes 1 and the weights' share 0),
so the loop can skip a non-finite step without reading the flag on the host.
"""
from __future__ import annotations

import torch
from torch import nn

_CHUNK = 1 << 25  # elements per foreach call where the update needs float64 or masked temporaries (256 MiB of f64)


def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    out, n = [], 0
    for p in pairs:
        out.append(p)
        n += p[0].numel()
        if n >= _CHUNK:
            yield out
            out, n = [], 0
    if out:
        yield out


def ema_labels(train: dict) -> list[str]:
    """What each EMA copy of a resolved [train] table is, in copy order: '500 kimg half-life' or '0.9999'."""
    ramp = float(train.get("ema_rampup", 0.0))
    hl = [f"{h:g} kimg half-life" + (f" (ramp-up {ramp:g})" if ramp > 0 else "") for h in train.get("ema_halflife_kimg", [])]
    return hl + [repr(float(d)) for d in train["ema"]]  # repr: every digit of a decay (":g" would round 0.9999999)


def ema_from_train(model: nn.Module, train: dict) -> "EMA":
    """The EMA copies a resolved [train] table asks for."""
    return EMA(model, train["ema"], train["ema_every"], halflife_kimg=train.get("ema_halflife_kimg", []),
               rampup=train.get("ema_rampup", 0.0), batch=train["batch"], offset=train.get("ema_offset", 0))


def halflife_beta(step: int, halflife_kimg: float, rampup: float, batch: int) -> float:
    """EDM's per-update decay at optimizer update `step` (1-based): 0.5 ** (B / max(min(H, rampup * nimg), 1e-8))."""
    h = halflife_kimg * 1000.0
    if rampup > 0:
        h = min(h, (step - 1) * batch * rampup)
    return 0.5 ** (batch / max(h, 1e-8))


class EMA:
    def __init__(self, model: nn.Module, decays: list[float], every: int = 1, *, halflife_kimg=(),
                 rampup: float = 0.0, batch: int = 1, offset: int = 0):
        self.decays = [float(d) for d in decays]
        self.halflife_kimg = [float(h) for h in halflife_kimg]
        self.rampup = float(rampup)
        self.batch = int(batch)
        self.every = int(every)
        self.offset = int(offset)  # updates after the finished steps k with k % every == offset
        if not 0 <= self.offset < self.every:
            raise ValueError(f"EMA offset {offset} must be in [0, every = {every})")
        self.shadows: list[dict[str, torch.Tensor]] = [
            {k: v.detach().clone().float() for k, v in model.state_dict().items()}
            for _ in range(len(self.halflife_kimg) + len(self.decays))
        ]
        self._model_ref: tuple | None = None  # (id(model), its first parameter's address, its state tensors)
        self._consts: dict[tuple, torch.Tensor] = {}

    def _state(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The model's state tensors (detached, sharing storage), cached: state_dict() per step costs host time."""
        first = next(model.parameters(), None)
        ptr = first.data_ptr() if first is not None else 0
        ref = self._model_ref
        if ref is None or ref[0] != id(model) or ref[1] != ptr:
            self._model_ref = ref = (id(model), ptr, [(k, v.detach()) for k, v in model.state_dict().items()])
        return ref[2]

    def decay(self, index: int, step: int) -> float:
        """The factor copy `index` applies at the update after finished step `step` (step % every == offset)."""
        nh = len(self.halflife_kimg)
        if index >= nh:
            return self.decays[index - nh] ** self.every  # python float: float64 arithmetic
        d = 1.0
        for k in range(max(1, step - self.every + 1), step + 1):
            d *= halflife_beta(k, self.halflife_kimg[index], self.rampup, self.batch)
        return d

    def _const(self, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if len(self._consts) > 64:  # half-life decays change every update during the ramp-up
            self._consts.clear()
        key = (value, dtype, str(device))
        if key not in self._consts:
            self._consts[key] = torch.full((), value, dtype=dtype, device=device)  # a fill: no host-to-device copy
        return self._consts[key]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, ok: torch.Tensor | None = None) -> None:
        """Call after optimizer step number `step` (1-based count of finished steps). `ok`: None (the step was
        applied) or a 0-dim bool tensor, False for a step the optimizer skipped (the copies then stay as they are)."""
        if step % self.every != self.offset:
            return
        state = self._state(model)
        for index, shadow in enumerate(self.shadows):
            d = self.decay(index, step)
            fl: list[tuple[torch.Tensor, torch.Tensor]] = []
            for k, v in state:
                s = shadow[k]
                if not v.dtype.is_floating_point:
                    if ok is None:
                        s.copy_(v)
                    else:
                        s.copy_(torch.where(ok, v, s))
                else:
                    fl.append((s, v))
            if not fl:
                continue
            if self.every == 1:
                self._update_f32(fl, d, ok)
            else:
                self._update_f64(fl, d, ok)

    def _update_f32(self, fl, d: float, ok) -> None:
        """s <- s * d, then s <- s + (1 - d) * w: the kernels of s.mul_(d).add_(w, alpha=1 - d)."""
        shadows = [s for s, _ in fl]
        if ok is None:
            vals = [v if v.dtype == torch.float32 else v.float() for _, v in fl]
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, vals, alpha=1.0 - d)
            return
        dev = shadows[0].device
        d_t = torch.where(ok, self._const(d, torch.float32, dev), self._const(1.0, torch.float32, dev))
        ok_t = ok.to(torch.float32)
        torch._foreach_mul_(shadows, d_t)  # s * d (or s * 1 = s)
        for part in _chunks(fl):
            masked = torch._foreach_mul([v.float() for _, v in part], ok_t)  # w * 1 = w exactly (or 0)
            torch._foreach_add_([s for s, _ in part], masked, alpha=1.0 - d)

    def _update_f64(self, fl, d: float, ok) -> None:
        """s <- float32(d * float64(s) + (1 - d) * float64(w))."""
        for part in _chunks(fl):
            s64 = [s.to(torch.float64, copy=True) for s, _ in part]
            w64 = [v.to(torch.float64, copy=True) for _, v in part]  # a copy even of float64 weights
            if ok is None:
                torch._foreach_mul_(s64, d)
                torch._foreach_mul_(w64, 1.0 - d)
            else:
                dev = s64[0].device
                one, zero = self._const(1.0, torch.float64, dev), self._const(0.0, torch.float64, dev)
                torch._foreach_mul_(s64, torch.where(ok, self._const(d, torch.float64, dev), one))
                torch._foreach_mul_(w64, torch.where(ok, self._const(1.0 - d, torch.float64, dev), zero))
            torch._foreach_add_(s64, w64)
            torch._foreach_copy_([s for s, _ in part], s64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (safetensors-friendly): 'ema{i}.{param}'."""
        return {f"ema{i}.{k}": v for i, sh in enumerate(self.shadows) for k, v in sh.items()}

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        for i, sh in enumerate(self.shadows):
            for k in sh:
                sh[k].copy_(flat[f"ema{i}.{k}"])

    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        model.load_state_dict({k: v.to(dtype=model.state_dict()[k].dtype) for k, v in self.shadows[index].items()})
