"""Scaling (the global batch over ranks and micro-batches): gradient accumulation, the divisibility error, and the
XL/2 recipe shrunk on a made-up latents folder, in one process and under 2 gloo ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import builtin, make_dit
from fakes import fake_latents
from fewstep.api import Batch, BuildContext, DataSpec
from fewstep.cli import app
from fewstep.engine.trainer import Trainer
from fewstep.recipe import load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class Replay:
    """An objective whose loss(net, micro_batch, step) uses the next fixed set of per-row draws."""

    def __init__(self, objective, draws):
        self.objective, self.draws = objective, iter(draws)

    def loss(self, net, batch, step):
        return self.objective.loss_given(net, batch.x, batch.y, cond=batch.cond, **next(self.draws))


def trainer_with_accum(tiny, accum):
    return Trainer(tiny(train={"accum": accum, "batch": 8}), "unused", show_progress=False)


def grads(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])


def fm_draws(x, gen):
    return {"e": torch.randn(x.shape, generator=gen, dtype=x.dtype), "t": torch.rand(x.shape[0], generator=gen, dtype=x.dtype),
            "y": torch.randint(0, 10, (x.shape[0],), generator=gen)}


def soflow_draws(x, gen, n_fm):
    """Per-row draws of one SoFlow micro-batch: its first n_fm rows are FM rows (s = t), the rest consistency rows."""
    B = x.shape[0]
    t = 0.05 + 0.9 * torch.rand(B, generator=gen, dtype=x.dtype)
    s = torch.cat([t[:n_fm], t[n_fm:] * torch.rand(B - n_fm, generator=gen, dtype=x.dtype)])
    l_c = s[n_fm:] + (t[n_fm:] - s[n_fm:]) * 0.7
    return {"e": torch.randn(x.shape, generator=gen, dtype=x.dtype), "t": t, "s": s, "l_c": l_c,
            "dropped": torch.rand(B, generator=gen) < 0.3, "y": torch.randint(0, 10, (B,), generator=gen)}


def concat_soflow(parts, n_fm):
    """One batch holding the micro-batches' rows with every FM row first (the layout loss_given expects)."""
    fm = lambda k: torch.cat([p[k][:n_fm] for p in parts])  # noqa: E731
    cons = lambda k: torch.cat([p[k][n_fm:] for p in parts])  # noqa: E731
    out = {k: torch.cat([fm(k), cons(k)]) for k in ("e", "t", "s", "dropped", "y")}
    out["l_c"] = torch.cat([p["l_c"] for p in parts])
    return out


@pytest.mark.parametrize("objective", ["fm", "soflow"])
def test_accumulated_gradient_equals_one_large_batch_with_the_same_per_row_draws(objective, tiny):
    """accum = 2 micro-batches of B/2 rows give the gradient of one batch of B rows holding the same rows with the
    same draws (noise, times, dropped labels), to 1e-12 relative in float64: every objective's loss is a sum over
    rows divided by B, so only float summation order differs. (With the objectives' own random draws each
    micro-batch draws afresh: equal in distribution, as for more GPUs, not bit for bit.)"""
    torch.manual_seed(0)
    spec = DataSpec((1, 8, 8), 10)
    ctx = BuildContext(data=spec)
    net = make_dit(1, 8, 10, size="XS/2", hidden=32, depth=2, heads=2).double()
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    if objective == "fm":
        obj = builtin("objective", "fm")(ctx)
        parts = [fm_draws(x[:4], gen), fm_draws(x[4:], gen)]
        whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        xs, order = x, torch.arange(8)
    else:
        obj = builtin("objective", "soflow")(ctx, fm_ratio=0.5, cfg_scale=2.0, cfg_drop=0.3, mix_ratio=0.5, p=0.5)
        parts = [soflow_draws(x[:4], gen, 2), soflow_draws(x[4:], gen, 2)]
        whole = concat_soflow(parts, 2)
        order = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7])  # FM rows of both micro-batches first
        xs = x[order]
    y_micro = [p.pop("y") for p in parts]
    y_whole = whole.pop("y")

    net.zero_grad()
    big = obj.loss_given(net, xs, y_whole, cond={}, **whole)
    big.loss.backward()
    g_big = grads(net).clone()

    net.zero_grad()
    tr = trainer_with_accum(tiny, 2)
    replay = Replay(obj, parts)
    batch = Batch(x, torch.cat(y_micro))
    loss, metrics = tr._backward(net, replay, batch, 0, torch.autocast("cpu", enabled=False), manual_sync=False)
    g_acc = grads(net)
    assert torch.allclose(loss.double(), big.loss.detach().double(), rtol=1e-12, atol=0)
    assert (g_acc - g_big).abs().max() <= 1e-12 * g_big.abs().max()
    assert g_big.abs().max() > 0
    if objective == "soflow":
        assert set(metrics) >= {"fm_mse", "cons_q2"}


def test_accum_splits_the_rank_rows_in_order_and_averages_the_loss(tiny):
    """The micro-batches are the rank's rows in order; the reported loss is their mean."""
    seen = []

    class Recorder:
        def loss(self, net, batch, step):
            seen.append(batch.x.clone())
            from fewstep.api import LossOutput

            out = net(batch.x, torch.zeros(len(batch.x)), torch.zeros(len(batch.x)), batch.y).pow(2).mean()
            return LossOutput(out + len(seen), {"k": float(len(seen))})

    net = make_dit(1, 8, 10, size="XS/2", hidden=32, depth=1, heads=2)
    x = torch.randn(12, 1, 8, 8)
    tr = Trainer(tiny(train={"accum": 3, "batch": 12}), "unused", show_progress=False)
    loss, metrics = tr._backward(net, Recorder(), Batch(x, torch.zeros(12, dtype=torch.long)), 0,
                                 torch.autocast("cpu", enabled=False), manual_sync=False)
    assert [s.shape[0] for s in seen] == [4, 4, 4] and torch.equal(torch.cat(seen), x)
    assert metrics["k"] == pytest.approx(2.0)  # mean of 1, 2, 3


def test_a_batch_not_divisible_by_ranks_times_accum_is_one_named_error(tmp_path):
    from conftest import tiny_dict
    import tomli_w

    path = tmp_path / "r.toml"
    path.write_text(tomli_w.dumps(tiny_dict(train={"batch": 10, "accum": 4})))
    res = CliRunner().invoke(app, ["check", str(path)])
    assert res.exit_code == 2 and "train.accum" in res.output and "10" in res.output and "Traceback" not in res.output
    # the world size is known only at launch: 2 ranks x accum 2 cannot split 6 rows; refused before any work
    from fewstep.engine.distributed import DistInfo
    from fewstep.errors import UserError

    r = recipe_from_dict(tiny_dict(train={"batch": 6, "accum": 2}))
    with pytest.raises(UserError, match=r"train.batch = 6 .* 2 processes x train.accum = 2 \(= 4\)"):
        Trainer(r, tmp_path / "run", show_progress=False, dist_info=DistInfo(rank=0, world=2)).run()
    assert not (tmp_path / "run").exists()


# -- the XL/2 recipe, shrunk, on a made-up latents folder ---------------------------------------------------------

@pytest.fixture(scope="module")
def xl2_data(tmp_path_factory):
    from test_latents import save_vae

    base = tmp_path_factory.mktemp("xl2")
    vae = save_vae(base / "vae", 0)  # a tiny AutoencoderKL (downsampling 8): 4x8x8 latents decode to 64x64
    root = fake_latents(base / "latents", n=16, shape=(4, 8, 8), classes=10, resolution=64, vae=vae)
    return root, vae


def shrunk(root, vae, out, **extra):
    sets = {"data.root": root, "data.vae": vae, "data.resolution": 64, "data.workers": 0,
            "backbone.depth": 2, "backbone.hidden": 64, "backbone.heads": 2,
            "train.steps": 4, "train.batch": 8, "train.log_every": 1, "train.checkpoint_every": 2, "train.device": "cpu",
            "train.precision": "fp32", "eval.every": 0, "eval.grid": 4, "eval.nfe": [1], "eval.batch": 4, **extra}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v) if not isinstance(v, Path) else json.dumps(str(v))}")]


def weights_of(run):
    from safetensors.torch import load_file

    ck = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ck / "model.safetensors"))


def test_xl2_recipe_shrunk_trains_in_one_process_with_accumulation(xl2_data, tmp_path):
    root, vae = xl2_data
    res = CliRunner().invoke(app, ["train", str(RECIPES / "soflow_xl2.toml"), "--out", str(tmp_path / "run"),
                                   *shrunk(root, vae, tmp_path, **{"train.accum": 2})])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if "step" in json.loads(l)][-1] == 4
    assert (tmp_path / "run" / "samples" / "step_00000004_nfe1.png").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo under torchrun")
def test_xl2_recipe_shrunk_under_two_gloo_ranks(xl2_data, tmp_path):
    """torchrun --nproc-per-node 2 -m fewstep train recipes/soflow_xl2.toml with accum 2: the global batch of 8 is
    4 rows per rank in 2 micro-batches (DDP all-reduces after the second, no_sync before), rank 0 alone writes
    the run folder."""
    root, vae = xl2_data
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fewstep",
           "train", str(RECIPES / "soflow_xl2.toml"), "--out", str(out), *shrunk(root, vae, tmp_path, **{"train.accum": 2})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(l).get("step") for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one writer: each step logged once
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    recipe = load_recipe(out / "recipe.toml")
    assert recipe.train["batch"] == 8 and recipe.backbone.options["size"] == "XL/2"
    w = weights_of(out)
    assert all(torch.isfinite(v).all() for v in w.values())
