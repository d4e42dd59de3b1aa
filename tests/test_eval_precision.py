"""`eval.precision` / `fewstep eval --precision`: the arithmetic of the network while it samples for metrics.

fp32 (default) leaves torch as it is; bf16 puts the sampler under bf16 autocast (and only the sampler: the data
source's `to_images` gets float32); tf32 turns the TF32 flags on for the sampler and restores them afterwards.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_dict
from fewstep.engine.trainer import Trainer
from fewstep.evaluation import generated_batches, sampling_precision
from fewstep.recipe import RecipeError, recipe_from_dict


class _Recorder:
    """A sampler that records the autocast state and TF32 flags it ran under and returns x0 = noise / 2."""

    def __init__(self):
        self.seen = []

    def sample(self, objective, net, noise, labels, nfe, generator=None):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                          torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        y = net(noise.flatten(1))  # a real matmul, so autocast shows in the result's dtype
        return (noise / 2 + 0 * y.sum()).to(y.dtype)


def _loaded(sampler, to_images_dtypes):
    def to_images(x):
        to_images_dtypes.append(x.dtype)
        return x

    spec = SimpleNamespace(shape=(1, 2, 2), num_classes=3)
    return SimpleNamespace(net=torch.nn.Linear(4, 4), data=SimpleNamespace(spec=spec, to_images=to_images),
                           sampler=sampler, objective=None, device=torch.device("cpu"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "tf32"])
def test_the_sampler_runs_in_the_asked_precision_and_to_images_in_float32(precision):
    rec, dtypes = _Recorder(), []
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out = list(generated_batches(_loaded(rec, dtypes), 10, 1, 0, 4, precision=precision))
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert [len(x) for x, _ in out] == [4, 4, 2]
    assert len(rec.seen) == 3
    autocast, dtype, tf32_matmul, tf32_conv = rec.seen[0]
    assert autocast == (precision == "bf16")
    if precision == "bf16":
        assert dtype == torch.bfloat16
    assert (tf32_matmul, tf32_conv) == ((True, True) if precision == "tf32" else (False, False))
    assert after == (False, False)  # restored
    assert dtypes == [torch.float32] * 3  # the decode side never sees bf16
    assert not torch.is_autocast_enabled("cpu")
    # bf16 x0 values are the noise / 2 rounded to bf16; fp32 exactly noise / 2
    x = torch.cat([x for x, _ in out])
    assert x.dtype == torch.float32


def test_bad_precision_is_named():
    with pytest.raises(Exception, match="fp32, tf32 or bf16"):
        with sampling_precision("fp16", "cpu"):
            pass
    with pytest.raises(RecipeError, match="eval.precision"):
        recipe_from_dict(tiny_dict(eval={"precision": "fp16"}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prec") / "run"
    Trainer(recipe_from_dict(tiny_dict(eval={"nfe": [1], "grid": 4, "batch": 8, "num_samples": 16})), out,
            show_progress=False).run()
    return out


def test_eval_precision_option_end_to_end(run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fewstep.cli import app

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    opts = ["-O", "feature_extractor=fewstep-pool48", "--metrics", "fid", "--nfe", "1"]
    res = {}
    for p in ("fp32", "bf16"):
        r = CliRunner().invoke(app, ["eval", str(run), *opts, "--precision", p, "--out", str(tmp_path / f"{p}.json")])
        assert r.exit_code == 0, r.output
        res[p] = json.loads((tmp_path / f"{p}.json").read_text())
        assert res[p]["protocol"]["precision"] == p
    f32 = res["fp32"]["results"][0]["metrics"]["fid"]
    b16 = res["bf16"]["results"][0]["metrics"]["fid"]
    assert f32 != b16  # bf16 really changed the samples ...
    assert abs(f32 - b16) < 0.05 * abs(f32) + 1e-3  # ... by rounding only
    bad = CliRunner().invoke(app, ["eval", str(run), *opts, "--precision", "fp16"])
    assert bad.exit_code == 2 and "fp32, tf32 or bf16" in bad.output and "Traceback" not in bad.output
