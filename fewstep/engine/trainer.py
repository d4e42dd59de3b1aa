"""One training loop for every objective.

The loop knows contracts only: it asks the objective for a loss, steps the
optimizer, updates the EMA copies, logs, samples grids and writes checkpoints.
Rank-dependent decisions live in `distributed.py`; rank 0 alone writes.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..build import build_components
from ..interfaces import Batch
from ..recipe import Recipe, recipe_from_dict
from ..sampling import generate
from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_grads, broadcast_params, init_distributed
from .ema import EMA

# keys that may change between a run and its resumption
_RESUMABLE_CHANGES = {("train", "steps"), ("train", "max_seconds"), ("train", "log_every"),
                      ("train", "checkpoint_every"), ("train", "keep_checkpoints"), ("train", "device")}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (exists without --resume, or differs from the recipe)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    wall_seconds: float
    ms_per_step: float
    peak_memory_mb: float
    skipped_steps: int
    num_params: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    grids: list[Path] = field(default_factory=list)


def _diff_recipes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for table in set(old) | set(new):
        a, b = old.get(table), new.get(table)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                if a.get(k) != b.get(k) and (table, k) not in _RESUMABLE_CHANGES and table != "eval":
                    diffs.append(f"{table}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b and table not in ("name", "description"):
            diffs.append(f"{table}: {a!r} -> {b!r}")
    return sorted(diffs)


def make_optimizer(params, train: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=train["lr"], betas=tuple(train["betas"]), eps=train["adam_eps"], weight_decay=train["weight_decay"])
    if device.type == "cuda" and train["optimizer"] in ("adamw", "adam"):
        kw["fused"] = True
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "radam": torch.optim.RAdam}[train["optimizer"]]
    return cls(params, **kw)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 console: Any = None, show_progress: bool = True, registry: Any = None, dist_info: DistInfo | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self.registry = registry
        self.show_progress = show_progress
        self.info = dist_info or init_distributed(recipe.train["device"])
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console

    # -- setup ------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> Path | None:
        """Check the folder, write recipe.toml, and return the checkpoint to resume from (if any)."""
        recipe_file = self.run_dir / "recipe.toml"
        ckpt_root = self.run_dir / "checkpoints"
        latest = ckpt.latest_checkpoint(ckpt_root)
        if self.resume:
            if not recipe_file.is_file():
                raise RunFolderError(f"--resume: {self.run_dir} holds no recipe.toml; nothing to resume")
            import tomllib

            old = tomllib.loads(recipe_file.read_text())
            diffs = _diff_recipes(old, self.recipe.to_dict())
            if diffs:
                raise RunFolderError(f"--resume: the recipe differs from the one {self.run_dir} was started with: "
                                     + "; ".join(diffs))
        elif (latest is not None or (self.run_dir / "metrics.jsonl").exists()) and not self.force:
            raise RunFolderError(f"run folder {self.run_dir} already holds a run; use --resume to continue it, "
                                 "--out to choose another folder, or --force to start over")
        if self.info.is_main:
            if not self.resume and self.force and self.run_dir.exists():
                import shutil

                for sub in ("checkpoints", "samples"):
                    shutil.rmtree(self.run_dir / sub, ignore_errors=True)
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            recipe_file.write_text(self.recipe.to_toml())
        self.info.barrier()
        return latest if self.resume else None

    # -- the loop ---------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> TrainResult:
        """Train to `train.steps` (or stop early at `until_step`, which still checkpoints)."""
        r, info = self.recipe, self.info
        tr, ev = r.train, r.eval
        device = info.device
        if tr["precision"] == "tf32" and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        resume_from = self._prepare_run_dir()

        comps = build_components(r, device=device, registry=self.registry)
        net, objective, sampler, data = comps.net, comps.objective, comps.sampler, comps.data
        if resume_from is None:  # fresh runs only (a resume loads its own weights): warm starts, before
            objective.prepare(net)  # compile/DDP broadcast, the optimizer and the EMA copies see the weights
        num_params = sum(p.numel() for p in net.parameters())
        model = net
        if tr["compile"]:
            model = torch.compile(net)
        # Objectives that call the unwrapped module (a JVP, say) ask for a manual all-reduce instead of DDP.
        manual_sync = info.enabled and bool(getattr(objective, "manual_grad_sync", False))
        if manual_sync:
            broadcast_params(net, info)
        elif info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = make_optimizer([p for p in net.parameters() if p.requires_grad], tr, device)
        ema = EMA(net, tr["ema"], tr["ema_every"])
        ema_net = copy.deepcopy(net).eval().requires_grad_(False)

        step = 0
        torch.manual_seed(info.rank_seed(tr["seed"]))
        random.seed(info.rank_seed(tr["seed"]))
        if resume_from is not None:
            net.load_state_dict(ckpt.load_weights(resume_from / "model.safetensors", device))
            ema.load_state_dict(ckpt.load_weights(resume_from / "ema.safetensors"))
            state = ckpt.load_state(resume_from)
            opt.load_state_dict(state["optimizer"])
            ckpt.set_rng_state(state["rng"])
            step = int(state["step"])
            if info.is_main:
                self.console.log(f"resumed from {resume_from} at step {step}")

        total = tr["steps"]
        stop = min(total, until_step) if until_step is not None else total
        local_batch = info.local_batch(tr["batch"])
        batches = data.batches(local_batch, seed=tr["seed"], start_step=step, rank=info.rank, world=info.world)
        autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if tr["precision"] == "bf16"
                    else contextlib.nullcontext())
        params = [p for p in net.parameters() if p.requires_grad]
        clip = tr["grad_clip"] if tr["grad_clip"] > 0 else float("inf")

        metrics_file = self.run_dir / "metrics.jsonl"
        window: dict[str, float] = {}
        window_n = 0
        bad_in_row = 0
        skipped = 0
        last_ckpt = str(resume_from) if resume_from is not None else None
        grids: list[Path] = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_start = time.perf_counter()
        t_window = t_start
        steps_done_here = 0
        last_metrics: dict[str, float] = {}

        progress = self._progress(total) if (info.is_main and self.show_progress) else None
        task = progress.add_task("train", total=total, completed=step, loss=float("nan"), sps=0.0) if progress else None
        try:
            with progress if progress is not None else contextlib.nullcontext():
                while step < stop:
                    b = next(batches)
                    batch = Batch(b.x.to(device, non_blocking=True), None if b.y is None else b.y.to(device, non_blocking=True),
                                  {k: v.to(device, non_blocking=True) for k, v in b.cond.items()})
                    if tr["warmup_steps"] > 0:
                        for g in opt.param_groups:
                            g["lr"] = tr["lr"] * min(1.0, (step + 1) / tr["warmup_steps"])
                    with autocast:
                        out = objective.loss(model, batch, step)
                    loss = out.loss
                    loss.backward()
                    if manual_sync:
                        all_reduce_grads(params, info)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                    finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))  # one sync per step
                    if not finite:
                        opt.zero_grad(set_to_none=True)
                        bad_in_row += 1
                        skipped += 1
                        step += 1
                        if info.is_main:
                            self.console.log(f"[yellow]step {step}: non-finite loss or gradient; step skipped "
                                             f"({bad_in_row} in a row)")
                        if bad_in_row >= tr["max_bad_steps"]:
                            raise TrainingDiverged(
                                f"{bad_in_row} non-finite steps in a row, the last at step {step}; "
                                f"last good checkpoint: {last_ckpt or 'none (no checkpoint written yet)'}")
                        continue
                    bad_in_row = 0
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    steps_done_here += 1
                    ema.update(net, step)

                    window_n += 1
                    for k, v in {"loss": loss.detach(), "grad_norm": grad_norm, **out.metrics}.items():
                        val = v.detach().float() if torch.is_tensor(v) else float(v)  # no sync until logged
                        window[k] = window.get(k, 0.0) + val
                    if step % tr["log_every"] == 0 or step == stop:
                        now = time.perf_counter()
                        sps = window_n / max(now - t_window, 1e-9)
                        last_metrics = {k: float(v) / window_n for k, v in window.items()}
                        rec = {"step": step, **last_metrics, "steps_per_s": sps, "lr": opt.param_groups[0]["lr"],
                               "skipped_steps": skipped, "time": now - t_start}
                        if info.is_main:
                            with open(metrics_file, "a") as fh:
                                fh.write(json.dumps(rec) + "\n")
                            if progress is not None:
                                progress.update(task, completed=step, loss=last_metrics["loss"], sps=sps)
                                if not self.console.is_terminal:
                                    self.console.log(f"step {step}/{total} loss {last_metrics['loss']:.4f} "
                                                     f"{sps:.1f} steps/s")
                        window, window_n, t_window = {}, 0, now
                    elif progress is not None:
                        progress.update(task, completed=step)

                    if tr["checkpoint_every"] and step % tr["checkpoint_every"] == 0 and step < stop:
                        last_ckpt = str(self._checkpoint(step, net, ema, opt, skipped))
                    if ev["every"] and step % ev["every"] == 0 and step < stop:
                        grids += self._grids(step, objective, sampler, ema, ema_net, data)
                    if tr["max_seconds"] and time.perf_counter() - t_start >= tr["max_seconds"]:
                        if info.is_main:
                            self.console.log(f"wall-clock budget of {tr['max_seconds']} s reached at step {step}")
                        break
        except KeyboardInterrupt:
            if info.is_main:
                self.console.log(f"[red]interrupted at step {step}; resume with --resume from {last_ckpt or 'the start'}")
            raise
        wall = time.perf_counter() - t_start
        self._checkpoint(step, net, ema, opt, skipped)
        grids += self._grids(step, objective, sampler, ema, ema_net, data)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        return TrainResult(self.run_dir, step, wall, 1000 * wall / max(steps_done_here, 1), peak, skipped,
                           num_params, last_metrics, grids)

    # -- helpers ----------------------------------------------------------------------------
    def _progress(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]:.1f} steps/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
        )

    def _checkpoint(self, step: int, net, ema: EMA, opt, skipped: int) -> Path | None:
        path = None
        if self.info.is_main:
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", step, net, ema, opt,
                                        {"skipped_steps": skipped, "recipe": self.recipe.name},
                                        keep=self.recipe.train["keep_checkpoints"])
        self.info.barrier()
        return path

    def _grids(self, step: int, objective, sampler, ema: EMA, ema_net, data) -> list[Path]:
        if not self.info.is_main:
            return []
        ev = self.recipe.eval
        ema.copy_to(ema_net, 0)
        out = []
        for nfe in ev["nfe"]:
            imgs = generate(objective, sampler, ema_net, data, ev["grid"], nfe, seed=ev["seed"], batch=ev["batch"],
                            device=self.info.device)
            nrow = data.spec.num_classes if 0 < data.spec.num_classes <= 16 else None
            out.append(data.save_preview(imgs, self.run_dir / "samples" / f"step_{step:08d}_nfe{nfe}.png", nrow=nrow))
        return out


def load_run_recipe(run_dir: str | Path, registry: Any = None) -> Recipe:
    import tomllib

    path = Path(run_dir) / "recipe.toml"
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no recipe.toml)")
    return recipe_from_dict(tomllib.loads(path.read_text()), str(path), registry)
