"""Training curves from run folders' metrics.jsonl: what `fewstep plot` draws and `fewstep compare` puts beside its
metrics plot. Reading and smoothing are separate from drawing, so tests check the numbers, not pixels."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunFolderError, UserError

#: metrics.jsonl keys that are bookkeeping, not curves
NOT_CURVES = ("step", "skipped_steps", "time", "lr")


@dataclass
class Curve:
    run: str  # the run's label: its folder name and objective
    metric: str
    steps: list[int]
    values: list[float]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl, in order (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: no metrics.jsonl (not a run folder, or the run has not logged a step yet; "
                             f"runs log with the jsonl logger, train.loggers)")
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def run_label(run_dir: str | Path) -> str:
    """'<folder> (<objective>)', the objective read from the run's recipe.toml when it has one."""
    run_dir = Path(run_dir)
    label = run_dir.name or str(run_dir)
    recipe = run_dir / "recipe.toml"
    if recipe.is_file():
        from .recipe import parse_toml

        try:
            objective = parse_toml(recipe.read_bytes()).get("objective", {}).get("name")
        except Exception:  # noqa: BLE001 - a label is best effort; a damaged recipe still plots
            objective = None
        if objective:
            label += f" ({objective})"
    return label


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over the last `k` points (fewer at the start); k = 1 leaves the values as they are."""
    if k < 1:
        raise ValueError("smoothing window must be >= 1")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


def available_metrics(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in records:
        for k, v in rec.items():
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen.setdefault(k)
    return list(seen)


def load_curves(runs: list[str | Path], metrics: list[str] | None = None, k: int = 1) -> list[Curve]:
    """One curve per run and metric (default metrics: `loss` and every other metric the runs logged)."""
    per_run = [(Path(r), read_metrics(r)) for r in runs]
    if metrics is None:
        names: dict[str, None] = {}
        for _, recs in per_run:
            for m in available_metrics(recs):
                names.setdefault(m)
        metrics = [m for m in names if m == "loss"] + [m for m in names if m not in ("loss", "grad_norm")]
    curves = []
    for run, recs in per_run:
        logged = available_metrics(recs)
        for m in metrics:
            if m not in logged:
                if len(per_run) == 1:
                    raise UserError(f"{run}: metric {m!r} is not in metrics.jsonl; it has: {', '.join(logged)}")
                continue
            pts = [(rec["step"], float(rec[m])) for rec in recs if isinstance(rec.get(m), (int, float))]
            pts = [(s, v) for s, v in pts if math.isfinite(v)]
            curves.append(Curve(run_label(run), m, [s for s, _ in pts], smooth([v for _, v in pts], k)))
    if not curves:
        raise UserError(f"none of the runs logged {', '.join(metrics)}")
    return curves


def log_scale_fits(values: list[float]) -> bool:
    """Log scale when every value is positive and they span more than a factor of 10."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def draw_curves(curves: list[Curve], out: str | Path, title: str | None = None):
    """One panel per metric, one line per run; returns the matplotlib figure (closed after saving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(c.metric for c in curves))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        mine = [c for c in curves if c.metric == m]
        for c in mine:
            ax.plot(c.steps, c.values, label=c.run, lw=1.2)
        if log_scale_fits([v for c in mine for v in c.values]):
            ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}; choose another --out") from None
    finally:
        plt.close(fig)
    return fig
