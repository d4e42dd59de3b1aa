"""Where every rank-dependent decision is made: process group, device, seeds, data shards.

The same entry point runs as one process or under ``torchrun``: ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment switch DDP on (NCCL on
CUDA, gloo on CPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, shows progress, writes checkpoints and sample grids."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def rank_seed(self, seed: int) -> int:
        """Per-rank seed (DiT's convention): seed * world + rank."""
        return seed * self.world + self.rank

    def local_batch(self, global_batch: int, accum: int = 1) -> int:
        """Rows this rank loads per optimizer step: global batch / world (then split into `accum` micro-batches)."""
        if global_batch % (self.world * accum):
            n = self.world * accum
            raise UserError(f"train.batch = {global_batch} (the global batch) is not divisible by {self.world} "
                            f"process{'es' if self.world > 1 else ''} x train.accum = {accum} (= {n}); choose a "
                            f"multiple of {n}, e.g. {max(n, global_batch // n * n)}, or change train.accum")
        return global_batch // self.world

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' was asked for but no CUDA device is available here; use 'auto' "
                            "(CUDA when present, else CPU) or 'cpu'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_choice: str = "auto") -> DistInfo:
    """Read the launcher's environment; initialise the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        # on GPUs both backends: NCCL for CUDA tensors (DDP), gloo for the CPU tensors of evaluation and checkpoints
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world
    return value


def all_reduce_grads(params, info: DistInfo) -> None:
    """Average .grad over ranks by hand, for objectives that call the unwrapped module.

    torch.func.jvp cannot take a DDP-wrapped module, and calling `model.module` silently
    bypasses DDP's gradient all-reduce. Objectives that do so set `manual_grad_sync = True`;
    the engine then skips the DDP wrapper and calls this after every backward.
    """
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def broadcast_params(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights (what DDP's constructor does)."""
    if info.enabled:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
