"""One training loop for every objective.

The loop knows contracts only: it asks the objective for a loss, steps the optimizer, updates the EMA
copies, logs, samples grids and writes checkpoints. Rank-dependent decisions live in `distributed.py`;
rank 0 alone writes. What the loop promises (docs/reliability.md):

- the run folder is locked for the whole run (`lock.py`): a second `fewstep train` into it is refused;
- `--force` keeps the old run until the new one has built and written its first file;
- `--resume` needs a checkpoint, continues bit-identically from the newest complete one, and drops the
  metrics lines logged after it;
- SIGTERM / SIGUSR1 write a checkpoint at the next step boundary and stop (:class:`Preempted`).

At the end, rank 0 writes the sample grids and runs the evaluators of ``eval.after_train`` on the final EMA
weights (the protocol of ``fewstep eval``), into RUN/eval_after_train.json.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..build import build_components
from ..errors import BuildError, FewstepError, Preempted, RunFolderError, RuntimeFault
from ..interfaces import Batch
from ..recipe import Recipe, recipe_from_dict
from ..sampling import generate, save_sample_grid
from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_grads, broadcast_params, init_distributed
from .ema import EMA, ema_from_train, ema_labels
from .lock import RunLock
from .prefetch import Prefetcher

# keys that may change between a run and its resumption
_RESUMABLE_CHANGES = {("train", "steps"), ("train", "max_seconds"), ("train", "log_every"),
                      ("train", "checkpoint_every"), ("train", "keep_checkpoints"), ("train", "device"), ("train", "accum"),
                      ("train", "loggers")}
PREVIOUS = ".previous-run"  # where --force keeps the old run until the new one has written its first file
MOVED = ".moved"  # marker in PREVIOUS: the whole old run is in there
SETTLE_AT_MOST = 1000  # steps the host may leave unread when log_every is larger (bounds the ledger's memory)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


class TrainingDiverged(RuntimeFault):
    """Too many consecutive non-finite steps."""


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
    final_metrics_step: int = 0  # the step the final metrics were logged at (the last finite window)
    headline: str = ""  # the objective's headline metric (a key of final_metrics)
    logger_failures: list[str] = field(default_factory=list)  # loggers that raised and were switched off
    evaluation: dict[int, dict[str, float]] = field(default_factory=dict)  # eval.after_train: nfe -> metrics


def _diff_recipes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for table in set(old) | set(new):
        a, b = old.get(table), new.get(table)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                if a.get(k) != b.get(k) and (table, k) not in _RESUMABLE_CHANGES and table not in ("eval", "loggers"):
                    diffs.append(f"{table}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b and table not in ("name", "description", "loggers"):
            diffs.append(f"{table}: {a!r} -> {b!r}")
    return sorted(diffs)


def _read_toml(path: Path) -> dict[str, Any]:
    from ..recipe import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RunFolderError(f"{path} cannot be read as a recipe ({exc}); the run folder is damaged") from None


class LoggerGroup:
    """The run's loggers (rank 0): each call goes to every logger; one that raises is named once, switched off,
    and the run goes on with the others."""

    def __init__(self, loggers: list[tuple[str, Any]], console: Any):
        self.loggers = loggers
        self.console = console
        self.failures: list[str] = []

    @classmethod
    def build(cls, recipe: Recipe, registry: Any, console: Any) -> "LoggerGroup":
        from ..build import BuildError
        from ..interfaces import BuildContext
        from ..registry import get_registry

        reg = registry or get_registry()
        out = []
        for name, opts in recipe.loggers.items():
            spec = reg.get("logger", name)
            try:
                out.append((name, spec.build(BuildContext(train_steps=recipe.train["steps"], seed=recipe.train["seed"]),
                                             **opts)))
            except FewstepError:
                raise
            except Exception as exc:  # noqa: BLE001 - name the logger and its package
                raise BuildError(f"{recipe.source}: logger {name!r} (package {spec.package}) cannot be built: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return cls(out, console)

    def _each(self, method: str, *args) -> None:
        for name, logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a broken sink must not stop training
                self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                self.loggers = [(n, lg) for n, lg in self.loggers if n != name]
                self.console.log(f"[yellow]logger {name!r} failed in {method} ({type(exc).__name__}: {exc}); it is "
                                 f"switched off, the run goes on with the others")

    def start(self, run_dir: Path, recipe: dict[str, Any], resume_step: int | None) -> None:
        self._each("start", run_dir, recipe, resume_step)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._each("log_scalars", step, scalars)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        self._each("log_images", step, images)

    def finish(self, summary: dict[str, Any]) -> None:
        self._each("finish", summary)

    def close(self) -> None:
        self._each("close")
        self.loggers = []


class StepLedger:
    """What each step did (finite or not, its loss and metrics), kept as device tensors and read on the host only
    when `settle` is called: the loop calls it at the steps that log, checkpoint, sample or stop (every step when
    the optimizer cannot skip a step on the device). Settling replays the steps in order as the loop used to at
    each step: a non-finite step is counted and reported, `max_bad_steps` of them in a row stop the run
    (TrainingDiverged, naming the step that made the run of bad steps long enough), and the finite steps' values
    are summed in float32 in step order, as the device did, so the logged means are the same numbers."""

    def __init__(self, max_bad_steps: int, skipped: int, console: Any = None):
        self.max_bad_steps = max_bad_steps
        self.console = console  # None: another rank, which reports nothing
        self.skipped = skipped  # all skipped steps of the run (a resume carries them over)
        self.bad_in_row = 0
        self.steps_done = 0  # finite steps of this process
        self.pending: list[tuple[int, Any, dict[str, Any]]] = []
        self.new_window()

    def new_window(self) -> None:
        self.sums: dict[str, Any] = {}
        self.window_n = 0
        self.window_skipped = 0

    def record(self, step: int, ok: Any, values: dict[str, Any]) -> None:
        """Step `step` (1-based) ended; `ok`: bool or 0-dim bool tensor; `values`: tensors or floats."""
        self.pending.append((step, ok, {k: v.detach() if torch.is_tensor(v) else v for k, v in values.items()}))

    def settle(self, last_ckpt: str | None) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        tensors = [t for _, ok, vals in pending for t in (ok, *vals.values()) if torch.is_tensor(t)]
        dev = tensors[0].device if tensors else None
        host = iter(torch.stack([t.float().reshape(()).to(dev) for t in tensors]).cpu().numpy() if tensors else ())
        for step, ok, vals in pending:  # the same order as `tensors`
            ok = bool(next(host)) if torch.is_tensor(ok) else bool(ok)
            vals = {k: next(host) if torch.is_tensor(v) else float(v) for k, v in vals.items()}
            if not ok:
                self.bad_in_row += 1
                self.skipped += 1
                self.window_skipped += 1
                if self.console is not None:
                    self.console.log(f"[yellow]step {step}: non-finite loss or gradient; step skipped "
                                     f"({self.bad_in_row} in a row)")
                if self.bad_in_row >= self.max_bad_steps:
                    raise TrainingDiverged(
                        f"training stopped: {self.bad_in_row} non-finite steps in a row, the last at step {step}; "
                        f"last good checkpoint: {last_ckpt or 'none (no checkpoint written yet)'}")
            else:
                self.bad_in_row = 0
                self.steps_done += 1
                self.window_n += 1
                for k, v in vals.items():  # float32 values add in float32 (numpy's rules match torch's here)
                    self.sums[k] = v if k not in self.sums else self.sums[k] + v

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.window_n for k, v in self.sums.items()}


class StopRequest:
    """SIGTERM / SIGUSR1 / a first Ctrl-C -> a flag the loop reads at each step boundary, where the run writes a
    checkpoint and stops (a second Ctrl-C stops at once). Handlers only on the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS + (signal.SIGINT,):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum is not None:  # a second Ctrl-C: stop now, without the checkpoint
                raise KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def make_optimizer(params, train: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer; Adam and AdamW use torch's fused kernel (CUDA and CPU), which also lets the loop skip
    a non-finite step on the device (`found_inf`) instead of reading the loss on the host every step."""
    kw = dict(lr=train["lr"], betas=tuple(train["betas"]), eps=train["adam_eps"], weight_decay=train["weight_decay"])
    if device.type in ("cuda", "cpu") and train["optimizer"] in ("adamw", "adam"):
        kw["fused"] = True
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "radam": torch.optim.RAdam}[train["optimizer"]]
    return cls(params, **kw)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 console: Any = None, show_progress: bool = True, registry: Any = None, dist_info: DistInfo | None = None,
                 final_grids: bool = True):
        """`final_grids` False: no sample grids and no `eval.after_train` evaluation at the end (`fewstep bench`
        times the loop only)."""
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self.registry = registry
        self.show_progress = show_progress
        self.final_grids = final_grids
        self.info = dist_info or init_distributed(recipe.train["device"])
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self._lock: RunLock | None = None
        self._stop_group = None
        self._after: dict[str, Any] = {}  # eval.after_train's evaluators, built before the first step (rank 0)

    # -- the run folder ---------------------------------------------------------------------
    def _inspect_folder(self) -> Path | None:
        """Read-only checks before anything is built; returns the checkpoint to resume from (or None)."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise RunFolderError(f"--out {run_dir} is a file, not a folder")
        recipe_file = run_dir / "recipe.toml"
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if self.resume:
            if not recipe_file.is_file():
                raise RunFolderError(f"--resume: {run_dir} holds no run (no recipe.toml); nothing to resume. Start it "
                                     f"without --resume")
            # the old recipe resolved like the new one: an option added since (at its default) is no difference
            old = recipe_from_dict(_read_toml(recipe_file), str(recipe_file), self.registry).to_dict()
            diffs = _diff_recipes(old, self.recipe.to_dict())
            if diffs:
                raise RunFolderError(f"--resume: the recipe differs from the one {run_dir} was started with: "
                                     + "; ".join(diffs))
            if latest is None:
                raise RunFolderError(f"--resume: {run_dir} has no complete checkpoint yet, so there is nothing to "
                                     f"resume; start it again with --force (or set train.checkpoint_every)")
            return latest
        if (latest is not None or (run_dir / "metrics.jsonl").exists() or recipe_file.exists()) and not self.force:
            raise RunFolderError(f"run folder {run_dir} already holds a run; use --resume to continue it, "
                                 "--out to choose another folder, or --force to start over")
        return None

    def _take_folder(self) -> None:
        """Rank 0, after the build: lock the folder, clean what killed runs left, and start or continue the run.

        --force moves the old run into RUN/.previous-run, writes the new recipe.toml (the new run's first file),
        and only then deletes the old run; a failure in between puts the old run back.
        """
        if self._lock is None:
            self._lock = RunLock.acquire(self.run_dir)
        self._recover()
        ckpt.clean_leftovers(self.run_dir / "checkpoints")
        prev = self.run_dir / PREVIOUS
        recipe_file = self.run_dir / "recipe.toml"
        if self.resume:
            return
        moved = []
        if self.force:
            keep = {RunLock.name_in(self.run_dir), PREVIOUS}
            items = [p for p in self.run_dir.iterdir() if p.name not in keep]
            if items:
                prev.mkdir()
                for item in items:
                    os.replace(item, prev / item.name)
                    moved.append(item.name)
                (prev / MOVED).touch()  # all of the old run is aside: from here on recipe.toml is the new run's
        try:
            tmp = recipe_file.with_name(f".recipe.toml.tmp-{os.getpid()}")
            tmp.write_text(self.recipe.to_toml())
            os.replace(tmp, recipe_file)
        except BaseException:
            for name in moved:
                os.replace(prev / name, self.run_dir / name)
            (prev / MOVED).unlink(missing_ok=True)
            if prev.is_dir() and not any(prev.iterdir()):
                prev.rmdir()
            raise
        if prev.is_dir():
            shutil.rmtree(prev, ignore_errors=True)

    def _recover(self) -> None:
        """Under the lock: a --force killed before the new run's first file left the old run in RUN/.previous-run;
        it comes back (once the new recipe.toml exists, the old run is the one to drop)."""
        prev = self.run_dir / PREVIOUS
        for tmp in self.run_dir.glob(".recipe.toml.tmp-*"):
            tmp.unlink(missing_ok=True)
        if not prev.is_dir():
            return
        if (prev / MOVED).exists() and (self.run_dir / "recipe.toml").exists():
            shutil.rmtree(prev, ignore_errors=True)  # the new run had written its first file
            return
        for item in prev.iterdir():  # the move was cut short, or the new run never wrote its first file
            if item.name != MOVED:
                os.replace(item, self.run_dir / item.name)
        (prev / MOVED).unlink(missing_ok=True)
        prev.rmdir()
        self.console.log(f"put back the run an interrupted --force had moved aside in {prev}")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- the loop ---------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> TrainResult:
        """Train to `train.steps` (or stop early at `until_step`, which still checkpoints)."""
        info = self.info
        info.local_batch(self.recipe.train["batch"], self.recipe.train["accum"])  # a named error before any work
        if info.is_main and self.run_dir.is_dir():  # an existing folder is locked before anything is read from it
            self._lock = RunLock.acquire(self.run_dir)
            self._recover()
        info.barrier()
        try:
            resume_from = self._inspect_folder()
        except BaseException:
            self._release()
            raise
        if self.recipe.train["precision"] == "tf32" and info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        comps = build_components(self.recipe, device=info.device, registry=self.registry)
        try:  # a misconfigured evaluator stops the run before it trains, not after
            self._after = self._build_after_train(comps.data) if info.is_main and self.final_grids else {}
        except BaseException:
            self._release()
            raise
        loggers = LoggerGroup.build(self.recipe, self.registry, self.console) if info.is_main else LoggerGroup([], self.console)
        try:
            if info.is_main:
                self._take_folder()
            info.barrier()
            with StopRequest() as stop:
                return self._loop(comps, resume_from, until_step, stop, loggers)
        finally:
            loggers.close()
            self._release()

    def _loop(self, comps, resume_from: Path | None, until_step: int | None, stop: StopRequest,
              loggers: "LoggerGroup") -> TrainResult:
        r, info = self.recipe, self.info
        tr, ev = r.train, r.eval
        device = info.device
        net, objective, sampler, data = comps.net, comps.objective, comps.sampler, comps.data
        if resume_from is None:  # fresh runs only (a resume loads its own weights): warm starts, before
            try:  # compile/DDP broadcast, the optimizer and the EMA copies see the weights
                objective.prepare(net)
            except FewstepError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a warm-start path that does not exist
                raise BuildError(f"{r.source}: [objective] {r.objective.name!r} could not prepare the run: "
                                 f"{type(exc).__name__}: {exc}") from exc
        num_params = sum(p.numel() for p in net.parameters())
        model = net
        if tr["compile"]:
            model = torch.compile(net, mode=tr["compile_mode"])
        # Objectives that call the unwrapped module (a JVP, say) ask for a manual all-reduce instead of DDP.
        manual_sync = info.enabled and bool(getattr(objective, "manual_grad_sync", False))
        if manual_sync:
            broadcast_params(net, info)
        elif info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = make_optimizer([p for p in net.parameters() if p.requires_grad], tr, device)
        ema = ema_from_train(net, tr)
        ema_net = copy.deepcopy(net).eval().requires_grad_(False)

        step = 0
        skipped = 0
        torch.manual_seed(info.rank_seed(tr["seed"]))
        random.seed(info.rank_seed(tr["seed"]))
        if resume_from is not None:
            ckpt.load_into(net, ckpt.load_weights(resume_from / "model.safetensors", device), resume_from / "model.safetensors")
            ema_state = ckpt.load_weights(resume_from / "ema.safetensors")
            try:
                ema.load_state_dict(ema_state)
            except (KeyError, RuntimeError) as exc:
                raise ckpt.CheckpointError(f"{resume_from / 'ema.safetensors'} does not fit this recipe's EMA copies "
                                           f"({', '.join(ema_labels(tr))}): {exc}") from None
            state = ckpt.load_state(resume_from)
            try:
                opt.load_state_dict(state["optimizer"])
                ckpt.set_rng_state(state["rng"])
                step = int(state["step"])
            except (KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise ckpt.CheckpointError(f"{resume_from / 'state.pt'} does not fit this run: {exc}") from None
            skipped = int(ckpt.read_meta(resume_from).get("skipped_steps", 0))
            if info.is_main:
                self.console.log(f"resumed from {resume_from} at step {step}")
        loggers.start(self.run_dir, r.to_dict(), step if resume_from is not None else None)

        total = tr["steps"]
        stop_at = min(total, until_step) if until_step is not None else total
        local_batch = info.local_batch(tr["batch"], tr["accum"])
        placed = data.place(device) if hasattr(data, "place") else ""
        if placed and info.is_main:
            self.console.log(placed)
        stream = data.batches(local_batch, seed=tr["seed"], start_step=step, rank=info.rank, world=info.world)
        autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if tr["precision"] == "bf16"
                    else contextlib.nullcontext())
        params = [p for p in net.parameters() if p.requires_grad]
        clip = tr["grad_clip"] if tr["grad_clip"] > 0 else float("inf")
        headline = getattr(objective, "headline_metric", "") or ""
        # fused Adam/AdamW skip a step on the device (found_inf): the host reads the finite flags, losses and
        # metrics only at the steps that log, checkpoint, sample or stop; other optimizers read them every step
        on_device = bool(opt.defaults.get("fused"))
        last_ckpt = str(resume_from) if resume_from is not None else None
        ledger = StepLedger(tr["max_bad_steps"], skipped, self.console if info.is_main else None)
        grids: list[Path] = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_start = time.perf_counter()
        t_window = t_start
        last_metrics: dict[str, float] = {}
        last_metrics_step = step
        start_step = step

        progress = self._progress(total, headline) if (info.is_main and self.show_progress) else None
        task = (progress.add_task("train", total=total, completed=step, loss=float("nan"), head=float("nan"), sps=0.0)
                if progress else None)
        batches = Prefetcher(stream, device) if step < stop_at else None
        try:
            with progress if progress is not None else contextlib.nullcontext():
                while step < stop_at:
                    batch = next(batches)
                    if tr["warmup_steps"] > 0:
                        for g in opt.param_groups:
                            g["lr"] = tr["lr"] * min(1.0, (step + 1) / tr["warmup_steps"])
                    loss, metrics = self._backward(model, objective, batch, step, autocast, manual_sync)
                    if manual_sync:
                        all_reduce_grads(params, info)
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                    if clip != float("inf"):
                        torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
                    ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
                    values = {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}
                    if on_device:  # the optimizer and the EMA skip a non-finite step themselves
                        opt.found_inf = (~ok).float()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        step += 1
                        ema.update(net, step, ok=ok)
                    else:
                        ok = bool(ok)  # one host synchronisation per step
                        if ok:
                            opt.step()
                            ema.update(net, step + 1)
                        opt.zero_grad(set_to_none=True)
                        step += 1
                    ledger.record(step, ok, values)
                    log_now = step % tr["log_every"] == 0 or step == stop_at
                    ckpt_now = bool(tr["checkpoint_every"]) and step % tr["checkpoint_every"] == 0 and step < stop_at
                    grid_now = bool(ev["every"]) and step % ev["every"] == 0 and step < stop_at
                    if not on_device or log_now or ckpt_now or grid_now or len(ledger.pending) >= SETTLE_AT_MOST:
                        ledger.settle(last_ckpt)  # reads this window's flags and values (synchronises the device)
                    if log_now:
                        now = time.perf_counter()
                        sps = (ledger.window_n + ledger.window_skipped) / max(now - t_window, 1e-9)
                        rec: dict[str, Any] = {}
                        if ledger.window_n:
                            last_metrics = ledger.means()
                            last_metrics_step = step
                            rec.update(last_metrics)
                        rec.update({"steps_per_s": sps, "lr": opt.param_groups[0]["lr"], "skipped_steps": ledger.skipped,
                                    "skipped_in_window": ledger.window_skipped, "time": now - t_start})
                        if info.is_main:
                            loggers.log_scalars(step, rec)
                            if progress is not None:
                                progress.update(task, completed=step, loss=rec.get("loss", float("nan")),
                                                head=rec.get(headline, float("nan")), sps=sps)
                                if not self.console.is_terminal:
                                    shown = f" {headline} {rec[headline]:.4g}" if headline in rec else ""
                                    self.console.log(f"step {step}/{total} loss {rec.get('loss', float('nan')):.4f}"
                                                     f"{shown} {sps:.1f} steps/s")
                        ledger.new_window()
                        t_window = now
                    elif progress is not None:
                        progress.update(task, completed=step)

                    if ckpt_now and not ledger.bad_in_row:
                        last_ckpt = str(self._checkpoint(step, net, ema, opt, ledger.skipped))
                    if grid_now:
                        grids += self._grids(step, objective, sampler, ema, ema_net, data, loggers)
                    if self._stop_requested(stop):
                        ledger.settle(last_ckpt)
                        path = self._checkpoint(step, net, ema, opt, ledger.skipped)
                        name = signal.Signals(stop.signum).name if stop.signum else "a signal"
                        raise Preempted(f"stopped by {name} at step {step}; checkpoint {path} written; continue with "
                                        f"--resume", stop.signum or signal.SIGTERM)
                    if tr["max_seconds"] and time.perf_counter() - t_start >= tr["max_seconds"]:
                        if info.is_main:
                            self.console.log(f"wall-clock budget of {tr['max_seconds']} s reached at step {step}")
                        break
                ledger.settle(last_ckpt)
        except KeyboardInterrupt:
            if info.is_main:
                self.console.log(f"[red]interrupted at step {step}; resume with --resume from {last_ckpt or 'the start'}")
            loggers.finish({"step": step, "status": "interrupted", "skipped_steps": ledger.skipped})
            raise
        except Preempted as exc:
            loggers.finish({"step": step, "status": f"preempted: {exc}", "skipped_steps": ledger.skipped})
            raise
        finally:
            if batches is not None:
                batches.close()
        wall = time.perf_counter() - t_start
        skipped, steps_done_here = ledger.skipped, ledger.steps_done
        if not (resume_from is not None and step == start_step):  # a resume with nothing left to do writes nothing new
            self._checkpoint(step, net, ema, opt, skipped)
        evaluation: dict[int, dict[str, float]] = {}
        if self.final_grids:
            grids += self._grids(step, objective, sampler, ema, ema_net, data, loggers)
            if self._after:
                evaluation = self._evaluate_after_train(objective, sampler, ema, ema_net, data)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        res = TrainResult(self.run_dir, step, wall, 1000 * wall / max(steps_done_here, 1), peak, skipped,
                          num_params, last_metrics, grids, last_metrics_step, headline, evaluation=evaluation)
        loggers.finish({"step": step, "status": "finished", "wall_seconds": wall, "ms_per_step": res.ms_per_step,
                        "skipped_steps": skipped, "parameters": num_params,
                        **({"peak_memory_mb": peak} if device.type == "cuda" else {}),
                        **{f"final/{k}": v for k, v in last_metrics.items()},
                        **{f"eval/nfe{n}/{k}": v for n, m in evaluation.items() for k, v in m.items()}})
        res.logger_failures = list(loggers.failures)
        return res

    # -- helpers ----------------------------------------------------------------------------
    def _backward(self, model, objective, batch: Batch, step: int, autocast, manual_sync: bool):
        """Gradients of this rank's rows, summed into .grad: one backward, or `train.accum` micro-batches.

        With accum = a the rank's rows are cut into a consecutive micro-batches of local_batch / a rows and
        each micro-batch's loss is back-propagated divided by a; DDP all-reduces once, after the last one. The
        objective draws its per-row randomness and splits its rows (e.g. SoFlow's FM share) per micro-batch, as
        the official codes do per GPU: accum a on w ranks follows the official run on a * w GPUs (the same rows,
        other random draws). Given the same per-row draws, the summed gradient is that of the whole batch up to
        float rounding (tests/test_scaling.py). Returns the mean loss (detached) and the mean of each metric.
        """
        accum = self.recipe.train["accum"]
        if accum == 1:
            with autocast:
                out = objective.loss(model, batch, step)
            out.loss.backward()
            return out.loss, out.metrics
        n = batch.x.shape[0] // accum
        total, sums = None, {}
        for j in range(accum):
            rows = slice(j * n, (j + 1) * n)
            mb = Batch(batch.x[rows], None if batch.y is None else batch.y[rows], {k: v[rows] for k, v in batch.cond.items()})
            last = j == accum - 1
            sync = model.no_sync() if (not last and not manual_sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with autocast:
                    out = objective.loss(model, mb, step)
                (out.loss / accum).backward()
            total = out.loss.detach() if total is None else total + out.loss.detach()
            for k, v in out.metrics.items():
                v = v.detach() if torch.is_tensor(v) else float(v)
                sums[k] = v if k not in sums else sums[k] + v
        return total / accum, {k: v / accum for k, v in sums.items()}

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether any rank got a stop signal; ranks agree at every step boundary (a CPU all-reduce over gloo,
        so no GPU synchronisation per step)."""
        if not self.info.enabled:
            return stop.signum is not None
        import torch.distributed as dist

        if self._stop_group is None:
            self._stop_group = dist.new_group(backend="gloo")
        flag = torch.tensor([stop.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        if flag.item() and stop.signum is None:
            stop.signum = int(flag.item())
        return bool(flag.item())

    def _progress(self, total: int, headline: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}")]
        if headline:
            cols.append(TextColumn(f"{headline} " + "{task.fields[head]:.4g}"))
        cols += [TextColumn("{task.fields[sps]:.1f} steps/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        return Progress(*cols, console=self.console, transient=False)

    def _checkpoint(self, step: int, net, ema: EMA, opt, skipped: int) -> Path | None:
        path = None
        if self.info.is_main:
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", step, net, ema, opt,
                                        {"skipped_steps": skipped, "recipe": self.recipe.name},
                                        keep=self.recipe.train["keep_checkpoints"])
        self.info.barrier()
        return path

    def _build_after_train(self, data) -> dict[str, Any]:
        from ..evaluation import build_evaluators
        from ..interfaces import BuildContext

        names = self.recipe.eval["after_train"]
        if not names:
            return {}
        return build_evaluators(names, recipe_eval=self.recipe.eval, registry=self.registry,
                                ctx=BuildContext(data=data.spec, train_steps=self.recipe.train["steps"],
                                                 seed=self.recipe.train["seed"]))

    def _evaluate_after_train(self, objective, sampler, ema: EMA, ema_net, data) -> dict[int, dict[str, float]]:
        """eval.after_train on rank 0: `fewstep eval`'s protocol on EMA copy 0 of the final checkpoint, every
        eval.nfe, eval.num_samples samples each; RUN/eval_after_train.json has eval.json's layout."""
        from ..evaluation import Dist, EvalSettings, evaluate_built
        from ..report import write_json
        from ..runs import LoadedRun

        ev = self.recipe.eval
        ema.copy_to(ema_net, 0)
        latest = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        loaded = LoadedRun(self.recipe, ema_net, objective, sampler, data, self.info.device, latest, 0)
        settings = EvalSettings(metrics=list(ev["after_train"]), num=ev["num_samples"], seed=ev["seed"], batch=ev["batch"],
                                precision=ev["precision"])
        result = evaluate_built(self.run_dir, loaded, ev["nfe"], self._after, settings, 0, None, Dist())
        path = self.run_dir / "eval_after_train.json"
        write_json(path, result.to_dict())
        for r in result.results:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
            self.console.log(f"after training, nfe={r.nfe}, {settings.num} samples: {shown}")
        self.console.log(f"wrote {path} ({result.seconds:.1f} s)")
        return {r.nfe: dict(r.metrics) for r in result.results}

    def _grids(self, step: int, objective, sampler, ema: EMA, ema_net, data, loggers=None) -> list[Path]:
        if not self.info.is_main:
            return []
        ev = self.recipe.eval
        ema.copy_to(ema_net, 0)
        out = []
        for nfe in ev["nfe"]:
            imgs = generate(objective, sampler, ema_net, data, ev["grid"], nfe, seed=ev["seed"], batch=ev["batch"],
                            device=self.info.device)
            out.append(save_sample_grid(data, imgs, self.run_dir / "samples" / f"step_{step:08d}_nfe{nfe}.png",
                                        objective=self.recipe.objective.name, nfe=nfe, step=step,
                                        ema=ema_labels(self.recipe.train)[0]))
        if loggers is not None:
            loggers.log_images(step, {f"samples/nfe{nfe}": path for nfe, path in zip(ev["nfe"], out)})
        return out


def load_run_recipe(run_dir: str | Path, registry: Any = None) -> Recipe:
    """The recipe a run folder was started with; a folder that is not a run is a named RunFolderError."""
    run_dir = Path(run_dir)
    path = run_dir / "recipe.toml"
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a folder; give a run folder (one that `fewstep train` wrote)")
    if not path.is_file():
        if (run_dir / PREVIOUS).is_dir():
            raise RunFolderError(f"{run_dir}: an interrupted `fewstep train --force` moved its run into {run_dir / PREVIOUS}; "
                                 f"`fewstep train RECIPE --out {run_dir} --resume` (or --force) puts it back first")
        raise RunFolderError(f"{run_dir} is not a run folder (no recipe.toml); give a folder that `fewstep train` wrote")
    return recipe_from_dict(_read_toml(path), str(path), registry)
