"""`fewstep plot`: one curve per run and metric, whose points are metrics.jsonl's; smoothing; log scale; errors."""
import json

import pytest
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.curves import draw_curves, load_curves, log_scale_fits, smooth
from fewstep.engine.trainer import Trainer
from fewstep.recipe import recipe_from_dict

from conftest import tiny_dict


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    for name, obj in (("a", {"name": "fm"}), ("b", {"name": "soflow", "fm_ratio": 0.5})):
        r = recipe_from_dict(tiny_dict(name=name, objective=obj, train={"steps": 5}, eval={"nfe": [1], "grid": 4}))
        Trainer(r, root / name, show_progress=False).run()
    return root / "a", root / "b"


def jsonl(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_smoothing_is_a_trailing_moving_average():
    assert smooth([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([3.0, 0.0, 6.0, 3.0], 3) == [3.0, 1.5, 3.0, 3.0]


def test_log_scale_only_where_it_fits():
    assert log_scale_fits([100.0, 2.0, 0.5]) and not log_scale_fits([1.0, 0.5]) and not log_scale_fits([0.0, 100.0])


def test_one_curve_per_run_and_metric_equal_to_metrics_jsonl(two_runs, tmp_path):
    a, b = two_runs
    curves = load_curves([a, b], ["loss", "fm_mse"])
    assert [(c.run, c.metric) for c in curves] == [("a (fm)", "loss"), ("a (fm)", "fm_mse"),
                                                   ("b (soflow)", "loss"), ("b (soflow)", "fm_mse")]
    for c in curves:
        lines = jsonl(a if c.run.startswith("a") else b)
        assert c.steps == [x["step"] for x in lines] == [1, 2, 3, 4, 5]
        assert c.values == [x[c.metric] for x in lines]
    fig = draw_curves(curves, tmp_path / "c.png")
    drawn = {(ax.get_title(), line.get_label()): list(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()}
    assert drawn == {(c.metric, c.run): c.values for c in curves}
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_plot_command(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "curves.png"
    res = CliRunner().invoke(app, ["plot", str(a), str(b), "--metric", "loss", "--smooth", "2", "--out", str(out)])
    assert res.exit_code == 0 and out.is_file(), res.output
    assert "2 curves" in res.output
    res = CliRunner().invoke(app, ["plot", str(a), "--metric", "fid"])
    assert res.exit_code == 2 and "'fid' is not in metrics.jsonl" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert res.exit_code == 2 and "no metrics.jsonl" in res.output
