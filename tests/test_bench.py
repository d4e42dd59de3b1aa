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


def test_kernel_kind_sorts_cuda_kernels_and_cpu_operators():
    from fewstep.bench import kernel_kind

    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_kind("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT") == "matmul"
    assert kernel_kind("aten::addmm") == "matmul" and kernel_kind("aten::mm") == "matmul"
    assert kernel_kind("triton_tem_fused_mm_0") == "matmul"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    # Inductor's fused element-wise kernels, norms and the optimizer are neither
    assert kernel_kind("triton_poi_fused__to_copy_add_mul_native_layer_norm_3") == "other"
    assert kernel_kind("triton_red_fused_convert_element_type_sum_7") == "other"
    assert kernel_kind("void at::native::multi_tensor_apply_kernel<...AdamW...>") == "other"


def test_profile_breakdown_splits_the_wall_time_per_step():
    from fewstep.bench import profile_breakdown

    kernels = [("nvjet_gemm_a", 30.0, 60), ("flash_fwd_kernel", 6.0, 12), ("triton_poi_fused_add_0", 9.0, 300)]
    p = profile_breakdown(kernels, window_ms=60.0, steps=3, top=2)
    assert p["step_ms"] == pytest.approx(20.0)
    assert p["kernel_ms"] == pytest.approx({"matmul": 10.0, "attention": 2.0, "other": 3.0})
    assert p["idle_ms"] == pytest.approx(5.0)  # 20 - (10 + 2 + 3): the device waited for the host
    assert p["share"] == pytest.approx({"matmul": 0.5, "attention": 0.1, "other": 0.15, "idle": 0.25})
    assert [k["name"] for k in p["top"]] == ["nvjet_gemm_a", "triton_poi_fused_add_0"]
    assert p["top"][1]["calls_per_step"] == pytest.approx(100.0) and p["top"][1]["ms_per_step"] == pytest.approx(3.0)
    # busier than the wall (overlapping streams): idle is clamped at 0, not negative
    assert profile_breakdown([("gemm", 90.0, 1)], window_ms=60.0, steps=3)["idle_ms"] == 0.0


def test_bench_profile_on_cpu_writes_a_trace_and_a_breakdown(tmp_path):
    import gzip

    from fewstep.cli import app

    recipe = tmp_path / "tiny.toml"
    import tomli_w

    recipe.write_text(tomli_w.dumps(tiny_dict(train={"device": "cpu", "batch": 4})))
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--recipe", str(recipe), "--objectives", "fm", "--steps", "2", "--warmup",
                                   "1", "--no-train-step", "--profile", str(tmp_path / "prof"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    p = json.loads(out.read_text())["rows"][0]["profile"]
    trace = json.loads(gzip.open(p["trace"]).read())
    assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    assert p["steps"] == 3 and p["step_ms"] > 0
    # on the CPU the operators' self times account for the step: the DiT's linear layers are most of it
    assert p["kernel_ms"]["matmul"] > 0 and p["kernel_ms"]["attention"] > 0
    assert sum(p["kernel_ms"].values()) + p["idle_ms"] == pytest.approx(p["step_ms"], rel=0.02)
    assert "where a step goes" in res.output
