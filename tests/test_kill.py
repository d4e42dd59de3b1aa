"""Nothing is lost: kill -9 at the worst moments, --force over a run, --resume without a checkpoint, two trainers
in one folder, and preemption by SIGTERM / SIGUSR1. Real processes (`python -m fewstep`), real signals.

Each kill is injected at a named moment by a driver that wraps one standard-library call (os.replace) in the
child process and sends SIGKILL to itself when that call is about to make a given file visible.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from conftest import tiny_dict
from fewstep.engine import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def write_recipe(tmp: Path, name: str = "r.toml", **tables) -> Path:
    p = tmp / name
    p.write_text(tomli_w.dumps(tiny_dict(**tables)))
    return p


def fewstep(*args, kill_when: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the CLI in a child process; with kill_when=NAME it SIGKILLs itself just before os.replace makes a
    file or folder whose path ends in NAME visible (the moment a write or a move would complete)."""
    code = "import sys\nfrom fewstep.cli import main\n"
    if kill_when:
        code += textwrap.dedent(f"""
            import os, signal
            _replace = os.replace
            def replace(src, dst, *a, **k):
                if os.fspath(dst).endswith({kill_when!r}):
                    os.kill(os.getpid(), signal.SIGKILL)
                return _replace(src, dst, *a, **k)
            os.replace = replace
        """)
    code += "sys.argv = ['fewstep'] + sys.argv[1:]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def weights(run: Path) -> tuple[dict, dict]:
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    return load_file(latest / "model.safetensors"), load_file(latest / "ema.safetensors")


def assert_same(a: Path, b: Path) -> None:
    for x, y in zip(weights(a), weights(b)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- 2a: --force keeps the old run until the new one has built and written its first file -----------------------

def test_force_with_a_recipe_that_cannot_build_keeps_the_old_run(tmp_path):
    good = write_recipe(tmp_path, train={"steps": 2})
    assert fewstep("train", good, "--out", tmp_path / "run").returncode == 0
    before = weights(tmp_path / "run")
    d = tiny_dict(train={"steps": 2})
    d["data"] = {"name": "gmm"}  # vector data: the DiT cannot be built for it
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps(d))
    res = fewstep("train", bad, "--out", tmp_path / "run", "--force")
    assert res.returncode == 2 and "image-shaped" in res.stderr, res.stderr
    after = weights(tmp_path / "run")  # the old run is all there
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert "gmm" not in (tmp_path / "run" / "recipe.toml").read_text()


@pytest.mark.parametrize("moment", [".previous-run/recipe.toml", "/run/recipe.toml"], ids=["moving-aside", "first-file"])
def test_force_killed_before_its_first_file_gives_the_old_run_back(tmp_path, moment):
    good = write_recipe(tmp_path, train={"steps": 2})
    assert fewstep("train", good, "--out", tmp_path / "run").returncode == 0
    before = weights(tmp_path / "run")
    res = fewstep("train", good, "--out", tmp_path / "run", "--force", "--set", "train.lr=0.01", kill_when=moment)
    assert res.returncode == -signal.SIGKILL
    # the old run sits aside; the next start in the folder puts it back and resumes it
    res = fewstep("train", good, "--out", tmp_path / "run", "--resume", "--set", "train.steps=3")
    assert res.returncode == 0, res.stderr
    assert "lr = 0.01" not in (tmp_path / "run" / "recipe.toml").read_text()
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000003"
    assert not (tmp_path / "run" / ".previous-run").exists()
    assert any(not torch.equal(before[0][k], weights(tmp_path / "run")[0][k]) for k in before[0])  # it trained on


# -- 2b: saving a checkpoint step again, killed in the middle -------------------------------------------------------

SAVE_TWICE = """
import sys, torch
from fewstep.engine import checkpoint as ckpt
from fewstep.engine.ema import EMA
root = __import__("pathlib").Path(sys.argv[1])
net = torch.nn.Linear(3, 3)
opt = torch.optim.Adam(net.parameters())
ema = EMA(net, [0.9])
ckpt.save_checkpoint(root, 4, net, ema, opt, {"skipped_steps": 0})
with torch.no_grad():
    net.weight.add_(1.0)
if len(sys.argv) > 2:
    import os, signal
    _replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)).startswith(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *a, **k)
    os.replace = replace
ckpt.save_checkpoint(root, 4, net, ema, opt, {"skipped_steps": 0})   # the same step once more
"""


@pytest.mark.parametrize("moment", ["step_00000004", "latest"])
def test_a_killed_resave_of_a_step_leaves_a_complete_checkpoint(tmp_path, moment):
    root = tmp_path / "checkpoints"
    res = subprocess.run([sys.executable, "-c", SAVE_TWICE, root, moment], env=ENV, capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    latest = ckpt.latest_checkpoint(root)
    assert latest is not None and ckpt.read_meta(latest)["step"] == 4
    assert load_file(latest / "model.safetensors")["weight"].shape == (3, 3)  # weights there and readable
    assert ckpt.load_state(latest)["step"] == 4
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    ckpt.clean_leftovers(root)  # what the next start does
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert moment == "latest" or leftovers  # killed before the rename: the half-written copy was there to clean


def test_a_completed_resave_moves_latest_to_the_new_copy(tmp_path):
    root = tmp_path / "checkpoints"
    res = subprocess.run([sys.executable, "-c", SAVE_TWICE, root], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step_00000004.1"
    assert load_file(latest / "model.safetensors")["weight"].min() > load_file(root / "step_00000004" / "model.safetensors")["weight"].min()


# -- 2c: --resume where no checkpoint was written -------------------------------------------------------------------

def test_resume_of_a_run_killed_before_its_first_checkpoint_says_so(tmp_path):
    r = write_recipe(tmp_path, train={"steps": 3, "checkpoint_every": 0})
    res = fewstep("train", r, "--out", tmp_path / "run", kill_when="checkpoints/step_00000003")  # killed as its first checkpoint lands
    assert res.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "recipe.toml").is_file()
    res = fewstep("train", r, "--out", tmp_path / "run", "--resume")
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr and "Traceback" not in res.stderr
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") is None  # and it did not train from step 0


# -- 3: one live trainer per folder ----------------------------------------------------------------------------------

def wait_for(pred, timeout=120.0):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.1)


def slow_recipe(tmp: Path, steps: int = 100000) -> Path:
    return write_recipe(tmp, "slow.toml", train={"steps": steps, "log_every": 1, "checkpoint_every": 4})


def start(*args, hold_after: int | None = None) -> subprocess.Popen:
    """`fewstep ARGS` in the background. hold_after=N: from optimizer step N+1 on, each step waits (up to 120 s)
    until a stop signal has reached the trainer's own handler, so a run cannot finish before the test's signal
    arrives however loaded the machine is (a 30-step tiny run takes 0.1 s; the test polls every 0.1 s)."""
    code = "import sys\nfrom fewstep.cli import main\n"
    if hold_after is not None:
        code += textwrap.dedent(f"""
            import signal, time
            from torch.optim.optimizer import register_optimizer_step_post_hook
            _got, _n, _signal = [], [0], signal.signal
            def _wrap(sig, handler):
                if sig in (signal.SIGTERM, signal.SIGUSR1) and callable(handler):
                    def handler(signum, frame, _h=handler):
                        _got.append(signum)
                        return _h(signum, frame)
                return _signal(sig, handler)
            signal.signal = _wrap
            def _hold(opt, args, kwargs):
                _n[0] += 1
                t0 = time.time()
                while _n[0] > {hold_after} and not _got and time.time() - t0 < 120:
                    time.sleep(0.01)
            register_optimizer_step_post_hook(_hold)
        """)
    code += "sys.argv = ['fewstep'] + sys.argv[1:]\nmain()\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def metrics_lines(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.is_file() else 0


def test_a_second_trainer_in_a_live_folder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    r = slow_recipe(tmp_path)
    first = start("train", r, "--out", tmp_path / "run")
    try:
        wait_for(lambda: metrics_lines(tmp_path / "run") >= 2)
        res = fewstep("train", r, "--out", tmp_path / "run", "--force")
        assert res.returncode == 2 and "in use by" in res.stderr and str(first.pid) in res.stderr, res.stderr
        lines = metrics_lines(tmp_path / "run")
    finally:
        first.kill()  # kill -9: the lock is not released by the process
        first.wait()
    assert lines >= 2
    res = fewstep("train", r, "--out", tmp_path / "run", "--resume", "--set", "train.steps=6")
    assert res.returncode == 0, res.stderr  # the stale lock was taken over


# -- 4: preemption ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_writes_a_checkpoint_and_resume_is_bit_identical(tmp_path, sig):
    steps = 30
    r = write_recipe(tmp_path, train={"steps": steps, "log_every": 1, "checkpoint_every": 0})
    straight = fewstep("train", r, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    proc = start("train", r, "--out", tmp_path / "run", hold_after=3)  # step 4 waits for the signal
    wait_for(lambda: metrics_lines(tmp_path / "run") >= 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    stopped = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    step = ckpt.read_meta(stopped)["step"]
    assert 3 <= step < steps and signal.Signals(sig).name in err and stopped.name in err
    res = fewstep("train", r, "--out", tmp_path / "run", "--resume")
    assert res.returncode == 0, res.stderr
    assert_same(tmp_path / "straight", tmp_path / "run")
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # each step logged once, whatever was logged after the checkpoint
