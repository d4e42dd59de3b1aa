"""Reports: what `fewstep eval` and `fewstep compare` print and write (tables, plots, JSON).

Nothing here trains or evaluates; :func:`write_compare_report` turns a ``fewstep.comparison.Comparison``
into OUT/compare.json, OUT/grids.png (sample previews, one row per objective), OUT/metrics.png and the
pictures evaluators draw themselves; :func:`render_table` and :func:`render_eval_table` are the tables.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .comparison import _mean_std
from .evaluation import jsonable
from .interfaces import Evaluator


def file_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def title_of(spec, proto: dict[str, Any], n_seeds: int, from_runs: bool) -> str:
    ref = proto.get("reference", {})
    if from_runs:
        budget = "existing runs"
    elif spec.budget == "equal-time":
        budget = f"equal-time {spec.seconds:.0f} s"
    else:
        budget = f"equal-steps {spec.base.train['steps']}"
    title = (f"{'/'.join(spec.metrics).upper()} on {ref.get('dataset', '?')} {ref.get('split', '')} "
             f"({proto.get('num_samples', '?')} samples vs {ref.get('num', '?')} reference), {proto.get('weights', 'EMA')}, "
             f"{budget}, {n_seeds} seed{'s' if n_seeds != 1 else ''}")
    return title + tools_of(proto)


def tools_of(proto: dict[str, Any]) -> str:
    """", torch-fidelity 0.4.0 (inception-v3-compat, weights 7ff4a85c)": the `tool` of every evaluator's record."""
    tools = []
    for rec in proto.get("evaluators", {}).values():
        if isinstance(rec, dict) and rec.get("tool"):  # each evaluator says in its record what produced its numbers
            tools.append(str(rec["tool"]))
    return "".join(f", {t}" for t in dict.fromkeys(tools))


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.4g}"
    if n > 1 and std is not None:
        text += f" ± {std:.2g}"
    return text


MAX_TABLE_METRICS = 6  # more columns stop fitting a terminal; compare.json has every metric


def render_table(entries: list[dict], title: str):
    from rich.table import Table

    names = []
    for e in entries:
        for k in e["metrics"]:
            if k not in names and not k.endswith("_std"):
                names.append(k)
    hidden = len(names) - MAX_TABLE_METRICS
    names = names[:MAX_TABLE_METRICS]
    t = Table(title=title, title_justify="left",
              caption=f"{hidden} more metric(s) per entry in compare.json" if hidden > 0 else None)
    t.add_column("objective")
    t.add_column("sampler")
    t.add_column("NFE", justify="right")
    for k in names:
        t.add_column(k, justify="right")
    for col in ("steps", "train s", "ms/step", "peak MB", "params"):
        t.add_column(col, justify="right")
    for e in entries:
        n = len(e["seeds"])
        tr = e["train"]
        steps_mean, _ = _mean_std([s for s in tr["steps"] if s is not None])
        wall, wall_sd = _mean_std(tr["wall_seconds"])
        ms, ms_sd = _mean_std(tr["ms_per_step"])
        peak, _ = _mean_std(tr["peak_memory_mb"])
        cells = [_fmt(e["metrics"][k]["mean"], e["metrics"][k]["std"], n) if k in e["metrics"] else ("error" if e.get("errors") else "-")
                 for k in names]
        t.add_row(e["objective"], e["sampler"]["name"], str(e["nfe"]), *cells,
                  "-" if steps_mean is None else f"{steps_mean:.0f}", _fmt(wall, wall_sd, n), _fmt(ms, ms_sd, n),
                  "-" if peak is None else f"{peak:.0f}", "-" if tr["num_params"] is None else f"{tr['num_params']:,}")
    return t


def headline_metric(entries: list[dict]) -> str | None:
    """The metric the plots show: the first one of the first evaluator."""
    keys = [k for e in entries for k in e["metrics"]]
    return next((k for k in keys if not k.endswith("_std")), None)


def write_plots(entries: list[dict], curves: list[dict], grids: dict, labels: Sequence[str], nfes: Sequence[int],
                out: Path, title: str) -> dict[str, str]:
    """grids.png (objectives x NFE previews, from samples/*.png) and metrics.png (metric vs NFE, metric vs step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    if grids:
        rows = [lb for lb in labels if any((lb, n) in grids for n in nfes)]
        fig, axes = plt.subplots(len(rows), len(nfes), figsize=(3.2 * len(nfes), 3.4 * len(rows)), squeeze=False)
        for i, lb in enumerate(rows):
            for j, nfe in enumerate(nfes):
                ax = axes[i][j]
                ax.axis("off")
                if (lb, nfe) in grids:
                    ax.imshow(plt.imread(grids[(lb, nfe)]), interpolation="nearest")
                ax.set_title(f"{lb}, NFE={nfe}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "grids.png", dpi=110)
        plt.close(fig)
        files["grids"] = "grids.png"
    metric = headline_metric(entries)
    if metric is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for li, lb in enumerate(labels):
            colour = colours[li % len(colours)]
            pts = [(e["nfe"], e["metrics"][metric]["mean"], e["metrics"][metric]["std"] or 0.0)
                   for e in entries if e["objective"] == lb and metric in e["metrics"] and e["metrics"][metric]["mean"] is not None]
            if pts:
                xs, ys, es = zip(*pts)
                a1.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=lb, color=colour)
            cs = [c for c in curves if c["label"] == lb and metric in c["metrics"]]
            for seed in sorted({c["seed"] for c in cs}):
                pts2 = sorted((c["step"], c["metrics"][metric]) for c in cs if c["seed"] == seed)
                a2.plot([p[0] for p in pts2], [p[1] for p in pts2], marker="o", color=colour,
                        label=lb if seed == min(c["seed"] for c in cs) else None)
        a1.set_xlabel("NFE")
        a1.set_xticks(list(nfes))
        a1.set_ylabel(metric.upper())
        a1.set_title(f"{metric.upper()} vs NFE (mean ± std over seeds)", fontsize=10)
        a1.legend()
        a2.set_xlabel("training step")
        a2.set_ylabel(metric.upper())
        a2.set_title(f"{metric.upper()} vs training step (NFE={min(nfes)})", fontsize=10)
        if a2.lines:
            a2.legend()
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        files["plot"] = "metrics.png"
    return files


def evaluator_plots(entries: list[dict], evaluators: dict[str, Evaluator], nfes: Sequence[int], out: Path) -> dict[str, str]:
    """Pictures an evaluator draws itself: an optional `plot(results, path)` method receives
    {objective: {metric: mean}} at the smallest NFE (e.g. gmm-exact's flow-map error heat maps)."""
    files: dict[str, str] = {}
    nfe0 = min(nfes)
    results = {e["objective"]: {k: v["mean"] for k, v in e["metrics"].items() if v["mean"] is not None}
               for e in entries if e["nfe"] == nfe0}
    for name, ev in evaluators.items():
        plot = getattr(ev, "plot", None)
        if callable(plot) and results:
            path = plot(results, out / f"{file_slug(name)}.png")
            if path is not None:
                files[f"plot_{name}"] = Path(path).name
    return files


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic, strict JSON (NaN/inf become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)




def render_eval_table(payload: dict[str, Any], run: Path, num: int):
    """`fewstep eval`'s table: a column per NFE, a row per metric."""
    from rich.table import Table

    proto = payload["protocol"]
    ref = proto["reference"]
    against = f"statistics {ref['statistics']}" if ref.get("statistics") else f"{ref['num']} {ref['dataset']} {ref['split']}"
    t = Table(title=f"{run} step {payload['step']}: {num} samples vs {against} reference, {proto['weights']}{tools_of(proto)}",
              title_justify="left")
    results = payload["results"]
    t.add_column("metric")
    for r in results:  # a column per NFE: any number of metrics fits
        t.add_column(f"NFE {r['nfe']}", justify="right")
    for k in dict.fromkeys(k for r in results for k in r["metrics"]):
        t.add_row(k, *[f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "-" for r in results])
    t.add_row("sampling s", *[f"{r['sample_seconds']:.1f}" for r in results], style="dim")
    t.add_row("metrics s", *[f"{r['eval_seconds']:.1f}" for r in results], style="dim")
    return t


def write_previews(comparison, console: Any, registry=None) -> dict[tuple[str, int], Path]:
    """One row of sample previews per objective (its first run), at every NFE: OUT/samples/<label>_nfe<k>.png."""
    from .runs import load_model
    from .sampling import generate, save_sample_grid

    spec = comparison.spec
    ev = spec.base.eval
    grids: dict[tuple[str, int], Path] = {}
    done: set[str] = set()
    for run in comparison.runs:
        if run.label in done:
            continue
        done.add(run.label)
        try:
            loaded = load_model(run.run, registry=registry)
        except Exception as exc:  # noqa: BLE001 - a missing picture must not lose the numbers
            console.log(f"[red]preview {run.label} failed: {type(exc).__name__}: {exc}")
            continue
        for nfe in spec.nfes:
            try:
                imgs = generate(loaded.objective, loaded.sampler, loaded.net, loaded.data, ev["grid"], nfe,
                                seed=ev["seed"], batch=ev["batch"], device=loaded.device, balanced=True)
                path = spec.out / "samples" / f"{file_slug(run.label)}_nfe{nfe}.png"
                grids[(run.label, nfe)] = save_sample_grid(loaded.data, imgs, path, objective=loaded.recipe.objective.name,
                                                           nfe=nfe, step=loaded.step, ema=loaded.ema_label)
            except Exception as exc:  # noqa: BLE001 - as above
                console.log(f"[red]preview {run.label} nfe {nfe} failed: {type(exc).__name__}: {exc}")
    return grids


def training_curves(comparison, console: Any) -> dict[str, str]:
    """OUT/training_curves.png: the loss and every other logged metric of each compared run (fewstep plot's picture)."""
    from .curves import draw_curves, load_curves

    runs = list(dict.fromkeys(r.run for r in comparison.runs))
    try:
        curves = load_curves(runs)
        draw_curves(curves, comparison.spec.out / "training_curves.png", title="training curves")
    except Exception as exc:  # noqa: BLE001 - a missing picture must not lose the numbers
        console.log(f"[red]training curves failed: {type(exc).__name__}: {exc}")
        return {}
    return {"training_curves": "training_curves.png"}


def write_compare_report(comparison, console: Any, registry=None) -> tuple[str, dict[str, str]]:
    """Pictures and compare.json for a Comparison; returns (title, {what: file name in OUT})."""
    spec = comparison.spec
    entries = [e.to_dict() for e in comparison.entries]
    curves = [c.to_dict() for c in comparison.curves]
    title = title_of(spec, comparison.protocol, comparison.n_seeds, comparison.from_runs)
    grids = write_previews(comparison, console, registry)
    files = write_plots(entries, curves, grids, comparison.labels, spec.nfes, spec.out, title)
    files.update(evaluator_plots(entries, comparison.evaluators, spec.nfes, spec.out))
    files.update(training_curves(comparison, console))
    payload = {
        "title": title,
        "protocol": comparison.protocol_record(),
        "entries": entries,
        "curves": curves,
        "runs": [r.to_dict() for r in comparison.runs],
        "files": files,
        "wall_seconds": comparison.wall_seconds,
    }
    write_json(spec.out / "compare.json", payload)
    return title, files
