"""`fewstep eval` and `fewstep compare` under torchrun: 2 gloo ranks give the numbers of one process.

Sampling is sharded by batch (batch k of the evaluation to rank k % world, its noise seeded with (seed, k)), the
reference images likewise; FID adds the ranks' float64 sums of features and outer products, KID gathers the
features and IS the images back in one process's order (their random subsets and splits pick rows by index).
21 samples in batches of 4 are 6 batches, 3 of 12 rows on rank 0 and 3 of 9 rows on rank 1: nothing may be
counted twice or dropped. Metrics run through torch-fidelity with the weight-free `fewstep-pool48` extractor.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_dict
from fewstep.engine.trainer import Trainer
from fewstep.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
N = 21  # not a multiple of 2 ranks x batch 4
OPTIONS = ["-O", "feature_extractor=fewstep-pool48", "-O", "kid_subsets=5", "-O", "kid_subset_size=8"]
METRICS = ["--metrics", "fid,kid,isc"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo under torchrun")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "run"
    recipe = recipe_from_dict(tiny_dict(eval={"nfe": [1], "grid": 4, "batch": 4, "num_samples": N}))
    Trainer(recipe, out, show_progress=False).run()
    return out


def torchrun(args, cache: Path, ranks: int = 2):
    """`torchrun --nproc-per-node RANKS -m fewstep ARGS`, one thread per process, with its own empty cache (the
    reference pass runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "FEWSTEP_CACHE": str(cache)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    proc = subprocess.run([*launch, "-m", "fewstep", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def eval_in_this_process(args, cache: Path, monkeypatch):
    """`fewstep eval ARGS` in this process, on one thread like each torchrun worker."""
    import torch
    from typer.testing import CliRunner

    from fewstep.cli import app

    monkeypatch.setenv("FEWSTEP_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, ["eval", *map(str, args)])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output


def test_eval_and_compare_on_two_gloo_ranks_equal_one_process(run, tmp_path, monkeypatch):
    eval_in_this_process([run, "--nfe", "1", "--num", N, *METRICS, *OPTIONS, "--out", tmp_path / "one.json"], tmp_path / "c1",
                         monkeypatch)
    # under torchrun -n, not --num: torchrun's own parser would take --num for its --numa-binding
    torchrun(["eval", run, "--nfe", "1", "-n", N, *METRICS, *OPTIONS, "--out", tmp_path / "two.json"], tmp_path / "c2")
    proc = torchrun(["compare", "--runs", run, "--nfe", "1", "-n", N, "--no-curve", *METRICS, *OPTIONS, "--out", tmp_path / "cmp"],
                    tmp_path / "c3")
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    m1, m2 = one["results"][0]["metrics"], two["results"][0]["metrics"]
    mc = {k: v["mean"] for k, v in cmp["entries"][0]["metrics"].items()}
    assert set(m1) == set(m2) == set(mc) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    assert m1["fid"] > 0.1  # a distance well away from 0, so a relative tolerance means something
    for k in m1:
        # float64 sums added in another order: FID to ~1e-10; KID and IS see the same rows in the same order
        assert m2[k] == pytest.approx(m1[k], rel=1e-9, abs=0), k
        assert mc[k] == pytest.approx(m1[k], rel=1e-9, abs=0), k
    for name in ("fid", "kid"):
        for ev in (one["protocol"]["evaluators"][name], two["protocol"]["evaluators"][name], cmp["protocol"]["evaluators"][name]):
            assert ev["num_generated"] == N and ev["num_reference"] == N  # every row once: none doubled, none dropped
        assert one["protocol"]["evaluators"][name]["ranks"] == 1
        assert two["protocol"]["evaluators"][name]["ranks"] == cmp["protocol"]["evaluators"][name]["ranks"] == 2
    assert two["protocol"]["evaluators"]["isc"]["num_generated"] == N
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports
    # rank 0 alone wrote the reference statistics cache
    assert len(list((tmp_path / "c2" / "fidelity").glob("reference-*.npz"))) == 1


def test_sample_npz_on_two_gloo_ranks_is_the_one_process_file(run, tmp_path, monkeypatch):
    """`fewstep sample RUN -n 21 --out x.npz` under 2 ranks: rank 0 alone gathers the rows (the others send and
    stop) and writes the same arrays, in the same order, as one process; no other rank writes."""
    import numpy as np
    import torch
    from typer.testing import CliRunner

    from fewstep.cli import app

    torchrun(["sample", run, "--nfe", "1", "-n", N, "--batch", "4", "--out", tmp_path / "two.npz"], tmp_path / "c2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, ["sample", str(run), "--nfe", "1", "-n", str(N), "--batch", "4",
                                       "--out", str(tmp_path / "one.npz")])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert sorted(one.files) == sorted(two.files)
        assert one["arr_0"].shape[0] == N and one["arr_0"].dtype == np.uint8
        for k in one.files:
            np.testing.assert_array_equal(one[k], two[k])
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".npz") == ["one.npz", "two.npz"]
