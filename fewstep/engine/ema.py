"""Exponential moving averages of the weights, one copy per decay.

Initialised as a copy of the weights at step 0, no warm-up (as both official codes do). Two update rules,
each the official one for its setting:

- every = 1 (ImageNet recipes; zlab-princeton/SoFlow train.py, the per-step EMA):
  e.mul_(d).add_(w, alpha=1 - d) in the shadow's float32.
- every = N > 1 (CIFAR recipes: 0.9999**16 every 16 steps; SoFlow train.py "CIFAR10 prefers a higher ema
  precision", py-meanflow models/ema.py update_ema_net): D = d**N, then e <- D e + (1 - D) w computed in
  float64 and stored back in float32.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decays: list[float], every: int = 1):
        self.decays = [float(d) for d in decays]
        self.every = int(every)
        self.shadows: list[dict[str, torch.Tensor]] = [
            {k: v.detach().clone().float() for k, v in model.state_dict().items()} for _ in self.decays
        ]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number `step` (1-based count of finished steps)."""
        if step % self.every:
            return
        state = model.state_dict()
        for decay, shadow in zip(self.decays, self.shadows):
            d = decay ** self.every  # python float: float64 arithmetic
            for k, v in state.items():
                s = shadow[k]
                if not v.dtype.is_floating_point:
                    s.copy_(v)
                elif self.every == 1:
                    s.mul_(d).add_(v.detach().float(), alpha=1.0 - d)
                else:
                    s.copy_(d * s.double() + (1.0 - d) * v.detach().double())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (safetensors-friendly): 'ema{i}.{param}'."""
        return {f"ema{i}.{k}": v for i, sh in enumerate(self.shadows) for k, v in sh.items()}

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        for i, sh in enumerate(self.shadows):
            for k in sh:
                sh[k].copy_(flat[f"ema{i}.{k}"])

    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        model.load_state_dict({k: v.to(dtype=model.state_dict()[k].dtype) for k, v in self.shadows[index].items()})
