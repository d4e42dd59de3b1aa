"""`fewstep bench`: the FLOP counter against closed forms, and the command end to end on a tiny CPU recipe."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_dit, tiny_dict
from fewstep.bench import BenchError, count_flops, objective_variant, parse_objectives
from fewstep.recipe import recipe_from_dict


def test_linear_flops_are_2mnk_and_three_times_that_with_backward():
    m, k, n = 7, 5, 3
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * m * n * k
    # backward: dL/dx = g W (2mnk) and dL/dW = g^T x (2mnk)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * m * n * k


def test_dit_forward_flops_match_the_closed_form():
    """Patch embedding, adaLN, qkv/proj/MLP matmuls, attention (QK^T and PV), final layer, time MLPs, counted exactly."""
    b, c, side = 2, 3, 8
    net = make_dit(c, side, 10, size="T/2", hidden=32, depth=2, heads=2).eval()
    d, depth, p = 32, 2, 2
    t_tok = (side // p) ** 2  # tokens
    mm = lambda rows, i, o: 2 * rows * i * o  # noqa: E731
    per_block = (mm(b, d, 6 * d)  # adaLN modulation
                 + mm(b * t_tok, d, 3 * d) + mm(b * t_tok, d, d)  # qkv, proj
                 + 2 * (2 * b * t_tok * t_tok * d)  # q k^T and P v over all heads
                 + mm(b * t_tok, d, 4 * d) + mm(b * t_tok, 4 * d, d))  # MLP
    expected = (mm(b * t_tok, c * p * p, d)  # patch embedding (a p x p stride-p conv)
                + 2 * (mm(b, 256, d) + mm(b, d, d))  # t and gap embedders: 256 frequencies -> d -> d
                + depth * per_block
                + mm(b, d, 2 * d) + mm(b * t_tok, d, p * p * c))  # final adaLN and linear
    x = torch.randn(b, c, side, side)
    t = torch.rand(b)
    with torch.no_grad():
        got = count_flops(lambda: net(x, t, t, torch.zeros(b, dtype=torch.long)))
    assert got == expected


def test_parse_objectives_and_bad_spelling():
    assert parse_objectives("fm, meanflow:jvp_mode=single:p=0.5") == [
        ("fm", "fm", {}), ("meanflow:jvp_mode=single:p=0.5", "meanflow", {"jvp_mode": "single", "p": 0.5})]
    with pytest.raises(BenchError, match="key=value"):
        parse_objectives("meanflow:single")
    with pytest.raises(BenchError, match="objective"):
        objective_variant(recipe_from_dict(tiny_dict()), "meanflow", {"jvp_mod": "single"}, batch=None, compile=None)


def test_bench_command_on_cpu_writes_every_field(tmp_path):
    from fewstep.cli import app

    recipe = tmp_path / "tiny.toml"
    import tomli_w

    d = tiny_dict(train={"device": "cpu", "batch": 4})
    recipe.write_text(tomli_w.dumps(d))
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--recipe", str(recipe), "--objectives", "fm,soflow", "--steps", "2",
                                   "--warmup", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    for key in ("card", "torch", "commit", "command", "matmul_tflops", "batch", "precision", "rows", "markdown"):
        assert key in rep
    assert rep["batch"] == 4 and rep["device"] == "cpu" and "bench" in rep["command"]
    fm, so = rep["rows"]
    assert fm["objective"] == "fm" and so["objective"] == "soflow"
    for row in (fm, so):
        assert row["ms"] > 0 and row["images_per_s"] == pytest.approx(4 / (row["ms"] / 1e3))
        assert row["gflop_per_step"] > 0 and row["tflops"] == pytest.approx(row["gflop_per_step"] / row["ms"])
        assert row["share_of_matmul"] == pytest.approx(row["tflops"] / rep["matmul_tflops"])
        assert row["train_ms"] > 0 and row["train_over_bare"] == pytest.approx(row["train_ms"] / row["ms"])
        assert row["peak_gib"] is None  # CPU: no allocator statistics
    assert fm["x_fm_time"] == 1.0
    assert sum("through torch's fused SDPA on this device: " in n for n in rep["notes"]) == 1  # the DiT's JVP probe
    # SoFlow runs more network passes than FM on the same batch (guidance and teacher forwards)
    assert so["gflop_per_step"] > fm["gflop_per_step"]


def test_bench_unknown_objective_is_one_line_error(tmp_path):
    from fewstep.cli import app

    recipe = tmp_path / "tiny.toml"
    import tomli_w

    recipe.write_text(tomli_w.dumps(tiny_dict(train={"device": "cpu"})))
    res = CliRunner().invoke(app, ["bench", "--recipe", str(recipe), "--objectives", "fm,sofloww"])
    assert res.exit_code == 2
    assert "sofloww" in res.output and "Traceback" not in res.output


def test_timer_steps_calls_in_order_and_times_each_call():
    import time

    from fewstep.bench import Timer

    seen = []

    def fn(i):
        seen.append(i)
        time.sleep(0.002 * (i + 1))

    ms = Timer("cpu").steps(fn, 4)
    assert seen == [0, 1, 2, 3] and len(ms) == 4
    assert all(m >= 2.0 * (i + 1) * 0.9 for i, m in enumerate(ms))  # each interval holds its own call's sleep
    assert ms[3] > ms[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA events); runs in the loop phase of benchmarks/gpu_session.sh on the GPU machine")
def test_timer_steps_on_cuda_intervals_add_up_to_the_whole_window():
    from fewstep.bench import Timer

    a = torch.randn(2048, 2048, device="cuda")
    timer = Timer("cuda")
    timer.steps(lambda i: a @ a, 3)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    ms = timer.steps(lambda i: [a @ a for _ in range(i + 1)], 5)
    end.record()
    end.synchronize()
    assert len(ms) == 5 and all(m > 0 for m in ms)
    assert sum(ms) <= start.elapsed_time(end) * 1.05
    assert ms[4] > 2.5 * ms[0]  # 5 matmuls against 1: the intervals follow each call's own work
