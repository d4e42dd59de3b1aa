"""Logger plugins: metrics.jsonl, TensorBoard event files read back, W&B offline run files, a failing logger isolated."""
import json
import sys

import pytest

import fewstep
from fewstep.engine.trainer import Trainer
from fewstep.recipe import RecipeError, recipe_from_dict

from conftest import tiny_dict


def lines(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_read_back_equal_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = recipe_from_dict(tiny_dict(train={"loggers": ["jsonl", "tensorboard"], "steps": 4},
                                   loggers={"tensorboard": {"flush_secs": 1}}))
    Trainer(r, tmp_path / "run", show_progress=False).run()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = lines(tmp_path / "run")
    assert [x["step"] for x in logged] == [1, 2, 3, 4]
    for key in ("loss", "fm_mse"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [x["step"] for x in logged]
        # TensorBoard stores float32
        assert [e.value for e in events] == pytest.approx([x[key] for x in logged], rel=1e-6)
    # the sample grid of the final evaluation point, and the recipe as text
    assert "samples/nfe1" in acc.Tags()["images"]
    assert acc.Images("samples/nfe1")[-1].step == 4
    assert "recipe" in "".join(acc.Tags()["tensors"])


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = recipe_from_dict(tiny_dict(train={"loggers": ["jsonl", "tensorboard"], "checkpoint_every": 2, "steps": 6}))
    Trainer(r, tmp_path / "run", show_progress=False).run(until_step=3)  # checkpoints at 2 and at the stop, 3
    Trainer(r, tmp_path / "run", resume=True, show_progress=False).run()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6] and len(steps) == 6  # every step once
    assert [x["step"] for x in lines(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_wandb_offline_writes_its_run_with_the_recipe_as_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    r = recipe_from_dict(tiny_dict(train={"loggers": ["jsonl", "wandb"], "steps": 3},
                                   loggers={"wandb": {"project": "fewstep-test", "tags": ["ci"]}}))
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert res.logger_failures == []
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((tmp_path / "run").rglob("*"))[:20]
    assert (runs[0] / f"run-{run_id}.wandb").is_file()
    # The offline run file holds the config and history as protobuf records whose values are compact JSON: each
    # recipe table is there under its key, and every logged loss under "loss".
    # wandb's service process may still be writing it when finish() returns: wait for the run's exit record
    import time

    deadline = time.monotonic() + 60
    while True:
        blob = (runs[0] / f"run-{run_id}.wandb").read_bytes()
        if b"final/loss" in blob and b"skipped_steps" in blob or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    text = blob.decode("latin-1")

    def config_value(key):
        dec = json.JSONDecoder()
        # a config item: the key field (tag 0x0a, length, key), the value field (tag 0x82 0x01, a varint length, JSON)
        anchor = "\n" + chr(len(key)) + key + "\x82\x01"
        for at in (i for i in range(len(text)) if text.startswith(anchor, i)):
            for start in (at + len(anchor) + 1, at + len(anchor) + 2):
                try:
                    return dec.raw_decode(text, start)[0]
                except ValueError:
                    continue
        raise AssertionError(f"config key {key!r} not in the run file")

    for table, value in r.to_dict().items():
        assert config_value(table) == value, table
    for x in lines(tmp_path / "run"):
        assert repr(x["loss"]).encode() in blob


def test_wandb_asked_for_but_missing_is_a_named_error_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fewstep.cli import app

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "w"\n[data]\nname = "digits"\nlimit = 32\n[backbone]\nname = "dit"\nsize = "T/2"\n'
                      'hidden = 32\ndepth = 1\nheads = 2\n[objective]\nname = "fm"\n'
                      '[train]\nsteps = 2\nbatch = 4\nloggers = ["jsonl", "wandb"]\n')
    res = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "wandb" in res.output and "pip install 'fewstep[wandb]'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class Exploding:
    """An in-process logger plugin that raises at its second scalar call."""

    __name__ = "exploding"

    @fewstep.hookimpl
    def register_loggers(register):
        from fewstep.api import Logger

        class Boom(Logger):
            calls = 0

            def start(self, run_dir, recipe, resume_step):
                pass

            def log_scalars(self, step, scalars):
                Boom.calls += 1
                if Boom.calls == 2:
                    raise OSError("disk quota exceeded")

        register("boom", lambda ctx: Boom(ctx), options=[])


def test_a_logger_that_raises_is_named_and_the_run_goes_on(tmp_path, registry):
    registry.register_plugin(Exploding, name="exploding")
    r = recipe_from_dict(tiny_dict(train={"loggers": ["boom", "jsonl"], "steps": 4}), registry=registry)
    res = Trainer(r, tmp_path / "run", show_progress=False, registry=registry).run()
    assert res.step == 4
    assert len(res.logger_failures) == 1 and "boom" in res.logger_failures[0]
    assert "disk quota exceeded" in res.logger_failures[0]
    assert [x["step"] for x in lines(tmp_path / "run")] == [1, 2, 3, 4]  # the other logger saw every step


def test_logger_tables_are_validated_like_plugin_tables():
    with pytest.raises(RecipeError, match="flush_sec"):
        recipe_from_dict(tiny_dict(train={"loggers": ["tensorboard"]}, loggers={"tensorboard": {"flush_sec": 3}}))
    with pytest.raises(RecipeError, match="wandb"):  # a table for a logger that train.loggers does not list
        recipe_from_dict(tiny_dict(loggers={"wandb": {"project": "x"}}))
    with pytest.raises(RecipeError, match="nolog"):
        recipe_from_dict(tiny_dict(train={"loggers": ["nolog"]}))

def test_set_reaches_a_logger_option(tmp_path):
    import tomli_w

    from fewstep.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_bytes(tomli_w.dumps(tiny_dict(train={"loggers": ["jsonl", "tensorboard"]})).encode())
    r = load_recipe(path, overrides=["loggers.tensorboard.flush_secs=7"])
    assert r.loggers["tensorboard"]["flush_secs"] == 7 and list(r.loggers) == ["jsonl", "tensorboard"]
