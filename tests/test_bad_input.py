"""Every mistake gets one named line, the right exit code, no traceback, and changes nothing outside the run folder.

One table of invalid inputs through the real CLI (Typer's CliRunner, in-process). Each case makes its files under
a temporary folder and returns the command line; the test asserts the exit code (2: the user's to fix; 1: a fault
while running), that the message names the key or file, that no traceback is printed, and that nothing in the
temporary folder changed except the run folder the case names.
"""
from __future__ import annotations

import os
import pickle
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import tomli_w
from typer.testing import CliRunner

from conftest import tiny_dict, write_recipe
from fewstep.cli import app

RUN = "run"  # the run folder every case may write to (tmp/run)


@dataclass
class Case:
    id: str
    make: Callable[[Path], list[str]]  # builds files under tmp, returns the CLI arguments
    code: int
    says: tuple[str, ...]  # substrings the message must contain (the key, the file, the component)


def recipe(tmp: Path, name: str = "r.toml", **tables) -> Path:
    """tiny_dict with `tables` merged in; a table naming another plugin replaces the tiny one (its keys would be
    unknown to the new plugin)."""
    d = tiny_dict()
    for table, values in tables.items():
        if values is None:
            d.pop(table, None)
        elif "name" in values and values["name"] != d.get(table, {}).get("name"):
            d[table] = dict(values)
        else:
            d[table] = {**d.get(table, {}), **values}
    p = tmp / name
    p.write_text(tomli_w.dumps(d))
    return p


def text_recipe(tmp: Path, text: str, name: str = "r.toml") -> Path:
    return write_recipe(tmp, name, text)


BASE = """
    [data]
    name = "digits"
    limit = 64
    [backbone]
    name = "dit"
    size = "T/2"
    hidden = 32
    depth = 1
    heads = 2
    [objective]
    name = "fm"
    [train]
    steps = 2
    batch = 8
"""


def base_with(extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["check", str(text_recipe(tmp, BASE + textwrap.dedent(extra)))]


def train(tmp: Path, *extra: str, **tables) -> list[str]:
    return ["train", str(recipe(tmp, **tables)), "--out", str(tmp / RUN), *extra]


def trained(tmp: Path, **train_opts) -> Path:
    """A finished tiny run in tmp/run (made before the snapshot, so it counts as the case's input)."""
    from fewstep.engine.trainer import Trainer
    from fewstep.recipe import recipe_from_dict

    Trainer(recipe_from_dict(tiny_dict(train={"steps": 2, **train_opts})), tmp / RUN, show_progress=False).run()
    recipe(tmp, train={"steps": 2, **train_opts})
    return tmp / RUN


def latest(run: Path) -> Path:
    from fewstep.engine import checkpoint as ckpt

    return ckpt.latest_checkpoint(run / "checkpoints")


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


class Evil:
    """Unpickling this would create a file: nothing fewstep loads may ever do that."""

    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def lock_and(args_of: Callable[[Path], list[str]]):
    def make(tmp: Path) -> list[str]:
        from fewstep.engine.lock import RunLock

        make._lock = RunLock.acquire(tmp / RUN)  # held by "another process" (this one) during the call
        return args_of(tmp)

    return make


def _resume_other_shapes(tmp: Path) -> list[str]:
    """A checkpoint whose weights come from a wider network (copied in from another run)."""
    from fewstep.engine.trainer import Trainer
    from fewstep.recipe import recipe_from_dict

    run = trained(tmp, checkpoint_every=1)
    wide = recipe_from_dict(tiny_dict(backbone={"hidden": 64}, train={"steps": 1}))
    Trainer(wide, tmp / "wide", show_progress=False).run()
    (latest(run) / "model.safetensors").write_bytes((latest(tmp / "wide") / "model.safetensors").read_bytes())
    return ["train", str(tmp / "r.toml"), "--out", str(run), "--resume", "--set", "train.steps=4"]


def _evil_state(tmp: Path) -> list[str]:
    run = trained(tmp)
    with open(latest(run) / "state.pt", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    return ["train", str(tmp / "r.toml"), "--out", str(run), "--resume", "--set", "train.steps=4"]


def _evil_torch_state(tmp: Path) -> list[str]:
    import torch

    run = trained(tmp)
    torch.save({"x": Evil()}, latest(run) / "state.pt")
    return ["train", str(tmp / "r.toml"), "--out", str(run), "--resume", "--set", "train.steps=4"]


def _no_checkpoint(tmp: Path) -> list[str]:
    (tmp / RUN).mkdir()
    (tmp / RUN / "recipe.toml").write_text(tomli_w.dumps(tiny_dict()))
    return ["train", str(recipe(tmp)), "--out", str(tmp / RUN), "--resume"]



PAPER = Path(__file__).resolve().parent.parent / "recipes"


def _latents_of_other_resolution(tmp: Path) -> list[str]:
    from fakes import fake_latents

    root = fake_latents(tmp / "latents128", n=4, shape=(4, 16, 16), resolution=128)
    return ["check", str(PAPER / "soflow_xl2.toml"), "--set", f"data.root={root}"]


def _latents_of_another_vae(tmp: Path) -> list[str]:
    from fakes import fake_latents
    from test_latents import save_vae

    vae = save_vae(tmp / "other-vae", 1)  # weights whose fingerprint is not the cache's
    root = fake_latents(tmp / "latents", n=4, vae="stabilityai/sd-vae-ft-mse")
    return ["check", str(PAPER / "soflow_xl2.toml"), "--set", f"data.root={root}", "--set", f"data.vae={vae}"]


def _import_args(tmp: Path, edit) -> list[str]:
    import torch

    from fewstep.build import build_components
    from fewstep.recipe import load_recipe
    from fewstep.registry import get_registry
    from fewstep_plugins.official import layouts as L

    if "import" not in {g.name for g in app.registered_groups}:
        get_registry().add_commands(app)  # `fewstep import` is a plugin command, added as the real CLI adds it
        from fewstep.cli import guard_commands

        guard_commands(app)
    r = recipe(tmp)
    sd = L.fewstep_to_soflow(build_components(load_recipe(r)).net.state_dict(), image_size=8)
    edit(sd, torch)
    torch.save({"model": sd, "ema_model": sd}, tmp / "official.pt")
    return ["import", "soflow", str(tmp / "official.pt"), "--recipe", str(r), "--out", str(tmp / RUN)]

CASES = [
    # -- the recipe file ------------------------------------------------------------------------------------
    Case("recipe-binary", lambda t: (t.joinpath("b.toml").write_bytes(b"\x89PNG\x00\xff\xfe"), ["check", str(t / "b.toml")])[1],
         2, ("b.toml", "not a text file")),
    Case("recipe-syntax", lambda t: ["check", str(text_recipe(t, "[data\nname = 1\n"))], 2, ("r.toml", "invalid TOML")),
    Case("recipe-missing", lambda t: ["check", str(t / "nope.toml")], 2, ("nope.toml", "does not exist")),
    Case("recipe-is-folder", lambda t: ["check", str(t)], 2, ("is a directory",)),
    Case("unknown-table", base_with("[trian]\nsteps = 3\n"), 2, ("trian.steps", "did you mean 'train'")),
    Case("unknown-top-key", lambda t: ["check", str(text_recipe(t, "nmae = 'x'\n" + textwrap.dedent(BASE)))],
         2, ("nmae", "did you mean 'name'")),
    Case("unknown-train-key", lambda t: ["check", str(recipe(t, train={"stpes": 3}))], 2, ("train.stpes", "did you mean 'steps'")),
    Case("unknown-objective-key", lambda t: ["check", str(recipe(t, objective={"name": "soflow", "fm_ration": 0.5}))],
         2, ("objective.fm_ration", "did you mean 'fm_ratio'")),
    Case("wrong-type", lambda t: ["check", str(recipe(t, train={"steps": "ten"}))], 2, ("train.steps", "must be int")),
    Case("bool-for-float", lambda t: ["check", str(recipe(t, train={"lr": True}))], 2, ("train.lr", "must be float")),
    Case("negative-lr", lambda t: ["check", str(recipe(t, train={"lr": -1.0}))], 2, ("train.lr", "out of range")),
    Case("zero-batch", lambda t: ["check", str(recipe(t, train={"batch": 0}))], 2, ("train.batch",)),
    Case("zero-log-every", lambda t: ["check", str(recipe(t, train={"log_every": 0}))], 2, ("train.log_every",)),
    Case("seed-2-64", lambda t: ["check", str(recipe(t, train={"seed": 2**64}))], 2, ("train.seed", "out of range")),
    Case("seed-negative", lambda t: ["check", str(recipe(t, train={"seed": -1}))], 2, ("train.seed",)),
    Case("eval-seed-huge", lambda t: ["check", str(recipe(t, eval={"seed": 2**40}))], 2, ("eval.seed",)),
    Case("inf-option", lambda t: ["check", str(text_recipe(t, BASE.replace('name = "fm"', 'name = "soflow"\np = inf')))],
         2, ("objective.p", "not a finite number")),
    Case("nan-option", lambda t: ["check", str(text_recipe(t, BASE.replace("batch = 8", "batch = 8\nlr = nan")))],
         2, ("train.lr", "not a finite number")),
    Case("out-of-range-plugin-option", lambda t: ["check", str(recipe(t, objective={"name": "soflow", "fm_ratio": 2.0}))],
         2, ("objective.fm_ratio",)),
    Case("bad-choice", lambda t: ["check", str(recipe(t, train={"precision": "fp8"}))], 2, ("train.precision", "fp8")),
    Case("bad-optimizer", lambda t: ["check", str(recipe(t, train={"optimizer": "sgd"}))], 2, ("train.optimizer",)),
    Case("three-betas", lambda t: ["check", str(recipe(t, train={"betas": [0.9, 0.99, 0.999]}))], 2, ("train.betas",)),
    Case("eval-nfe-zero", lambda t: ["check", str(recipe(t, eval={"nfe": [0]}))], 2, ("eval.nfe",)),
    Case("unknown-metric", lambda t: ["check", str(recipe(t, eval={"metrics": ["fidd"]}))], 2, ("eval.metrics", "fidd")),
    Case("unknown-objective", lambda t: ["check", str(recipe(t, objective={"name": "sofloww"}))],
         2, ("objective.name", "sofloww", "did you mean 'soflow'")),
    Case("unknown-backbone", lambda t: ["check", str(recipe(t, backbone={"name": "vit"}))], 2, ("backbone.name", "vit")),
    Case("unknown-dataset", lambda t: ["check", str(recipe(t, data={"name": "imagenet"}))], 2, ("data.name", "imagenet")),
    Case("unknown-sampler", lambda t: ["check", str(recipe(t, sampler={"name": "eulr"}))], 2, ("sampler.name", "eulr")),
    Case("missing-data", lambda t: ["check", str(recipe(t, data=None))], 2, ("data.name", "missing")),
    Case("missing-objective", lambda t: ["check", str(recipe(t, objective=None))], 2, ("objective.name",)),
    Case("name-not-string", lambda t: ["check", str(recipe(t, objective={"name": 3}))], 2, ("objective.name", "must be a string")),
    Case("extends-missing", lambda t: ["check", str(text_recipe(t, 'extends = "gone.toml"\n'))], 2, ("extends", "gone.toml")),
    Case("extends-cycle", lambda t: (text_recipe(t, 'extends = "b.toml"\n', "a.toml"), text_recipe(t, 'extends = "a.toml"\n', "b.toml"),
                                     ["check", str(t / "a.toml")])[-1], 2, ("extends", "circular")),
    Case("extends-not-string", lambda t: ["check", str(text_recipe(t, "extends = 3\n"))], 2, ("extends", "path string")),
    Case("name-with-slash", lambda t: ["check", str(text_recipe(t, 'name = "../escape"\n' + textwrap.dedent(BASE)))],
         2, ("name", "../escape", "path separators")),
    Case("name-absolute", lambda t: ["check", str(text_recipe(t, 'name = "/tmp/abs"\n' + textwrap.dedent(BASE)))],
         2, ("name", "/tmp/abs")),
    Case("set-name-escape", lambda t: ["train", str(recipe(t)), "--set", "name=../../x"], 2, ("name", "../../x")),
    Case("set-no-equals", lambda t: ["check", str(recipe(t)), "--set", "train.steps"], 2, ("train.steps", "table.key=value")),
    Case("set-unknown-table", lambda t: ["check", str(recipe(t)), "--set", "trian.steps=3"], 2, ("trian.steps", "did you mean 'train'")),
    Case("set-bad-key", lambda t: ["check", str(recipe(t)), "--set", "stepz=3"], 2, ("stepz",)),
    Case("set-wrong-type", lambda t: ["check", str(recipe(t)), "--set", "train.lr=fast"], 2, ("train.lr", "must be float")),
    Case("set-extends", lambda t: ["check", str(recipe(t)), "--set", "extends=other.toml"], 2, ("extends",)),
    # -- components that cannot be built (check reports what train would) ------------------------------------
    Case("vector-data-image-backbone", lambda t: ["check", str(recipe(t, data={"name": "gmm"}))], 2, ("[backbone]", "dit", "image-shaped")),
    Case("bad-dit-size", lambda t: ["check", str(recipe(t, backbone={"size": "Q/2"}))], 2, ("[backbone]", "unknown DiT size")),
    Case("dit-heads", lambda t: ["check", str(recipe(t, backbone={"hidden": 36, "heads": 5}))], 2, ("[backbone]", "'dit'", "AssertionError")),
    Case("dit-patch", lambda t: ["check", str(recipe(t, backbone={"size": "T/3"}))], 2, ("[backbone]", "not divisible")),
    Case("train-vector-data-image-backbone", lambda t: train(t, data={"name": "gmm"}), 2, ("[backbone]", "image-shaped")),
    Case("after-train-unknown-evaluator", lambda t: ["check", str(recipe(t, eval={"after_train": ["digit-accuracy"]}))], 2,
         ("eval.after_train", "did you mean 'digits-accuracy'")),
    Case("after-train-digits-accuracy-on-gmm", lambda t: train(t, data={"name": "gmm", "num_samples": 64},
                                                           backbone={"name": "mlp", "width": 16, "depth": 1},
                                                           eval={"after_train": ["digits-accuracy"]}),
         2, ("digits-accuracy", "'gmm8x2'", "eval.after_train")),
    Case("after-train-digits-accuracy-unconditional", lambda t: ["check", str(recipe(
        t, data={"conditional": False}, eval={"after_train": ["digits-accuracy"]}))], 2, ("digits-accuracy", "0 classes", "data.conditional = true")),
    Case("cuda-without-cuda", lambda t: ["check", str(recipe(t, train={"device": "cuda"}))], 2, ("train.device", "no CUDA")),
    Case("train-cuda-without-cuda", lambda t: train(t, train={"device": "cuda"}), 2, ("no CUDA",)),
    Case("soflow-own-check", lambda t: ["check", str(recipe(t, objective={"name": "soflow", "cfg_scale": 3.0, "cfg_drop": 0.0}))],
         2, ("[objective]", "soflow", "cfg_drop")),
    Case("meanflow-own-check", lambda t: ["check", str(recipe(t, objective={"name": "meanflow", "cfg_t_min": 0.9, "cfg_t_max": 0.5}))],
         2, ("[objective]", "meanflow", "cfg_t_min")),
    Case("ect-own-check", lambda t: ["check", str(recipe(t, objective={"name": "ect", "sigma_min": 100.0}))],
         2, ("[objective]", "ect", "sigma_min")),
    Case("ect-init-from-missing", lambda t: train(t, objective={"name": "ect", "init_from": str(t / "nowhere")}),
         2, ("[objective]", "ect", "nowhere")),
    Case("unet-small-image", lambda t: ["check", str(recipe(t, backbone={"name": "unet", "channel_mult": [1, 1, 1, 1, 1]}))],
         2, ("backbone.channel_mult", "not divisible")),
    Case("cifar10-no-root", lambda t: ["check", str(recipe(t, data={"name": "cifar10", "root": str(t / "none")}))],
         2, ("cifar10", "none")),
    Case("imagefolder-empty", lambda t: (t.joinpath("imgs").mkdir(), ["check", str(recipe(t, data={"name": "imagefolder",
                                                                                                   "root": str(t / "imgs")}))])[1],
         2, ("imagefolder", "imgs")),
    # -- run folders -------------------------------------------------------------------------------------------
    Case("existing-run", lambda t: (trained(t), ["train", str(t / "r.toml"), "--out", str(t / RUN)])[1], 2, (RUN, "--resume")),
    Case("resume-nothing", lambda t: ["train", str(recipe(t)), "--out", str(t / RUN), "--resume"], 2, ("--resume", "no run")),
    Case("resume-no-checkpoint", _no_checkpoint, 2, ("--resume", "no complete checkpoint")),
    Case("resume-changed-recipe", lambda t: (trained(t), ["train", str(t / "r.toml"), "--out", str(t / RUN), "--resume",
                                                          "--set", "train.lr=0.5"])[1], 2, ("train.lr",)),
    Case("out-is-a-file", lambda t: (t.joinpath("f").write_text("x"), ["train", str(recipe(t)), "--out", str(t / "f")])[1],
         2, ("f", "is a file")),
    Case("out-under-a-file", lambda t: (t.joinpath("f").write_text("x"), ["train", str(recipe(t)), "--out", str(t / "f" / "run")])[1],
         2, ("f/run", "Not a directory")),
    Case("locked-run", lock_and(lambda t: train(t, "--force")), 2, (RUN, "in use by", str(os.getpid()))),
    Case("resume-truncated-weights", lambda t: (truncate(latest(trained(t)) / "model.safetensors"),
                                                ["train", str(t / "r.toml"), "--out", str(t / RUN), "--resume",
                                                 "--set", "train.steps=4"])[1], 2, ("model.safetensors", "damaged")),
    Case("resume-truncated-state", lambda t: (truncate(latest(trained(t)) / "state.pt"),
                                              ["train", str(t / "r.toml"), "--out", str(t / RUN), "--resume",
                                               "--set", "train.steps=4"])[1], 2, ("state.pt", "cannot read")),
    Case("resume-other-shapes", _resume_other_shapes, 2, ("model.safetensors", "does not fit")),
    Case("resume-pickled-code", _evil_state, 2, ("state.pt", "nothing in it was executed")),
    Case("resume-torch-pickled-code", _evil_torch_state, 2, ("state.pt",)),
    Case("damaged-run-recipe", lambda t: ((trained(t) / "recipe.toml").write_bytes(b"\xff\xfe not toml"),
                                          ["sample", str(t / RUN), "--num", "2"])[1], 2, ("recipe.toml",)),
    # -- sample / eval -------------------------------------------------------------------------------------------
    Case("sample-not-a-run", lambda t: (t.joinpath("empty").mkdir(), ["sample", str(t / "empty")])[1], 2, ("empty", "not a run folder")),
    Case("sample-no-checkpoint", lambda t: (_no_checkpoint(t), ["sample", str(t / RUN)])[1], 2, (RUN, "has no checkpoint yet")),
    Case("sample-truncated-ema", lambda t: (truncate(latest(trained(t)) / "ema.safetensors"), ["sample", str(t / RUN), "--num", "2"])[1],
         2, ("ema.safetensors",)),
    Case("sample-missing-ema-copy", lambda t: (trained(t), ["sample", str(t / RUN), "--num", "2", "--ema", "5"])[1],
         2, ("ema.safetensors", "no EMA copy 5")),
    Case("sample-nfe-zero", lambda t: (trained(t), ["sample", str(t / RUN), "--nfe", "0"])[1], 2, ("--nfe",)),
    Case("sample-seed-huge", lambda t: (trained(t), ["sample", str(t / RUN), "--seed", str(2**64)])[1], 2, ("--seed",)),
    Case("eval-not-a-run", lambda t: (t.joinpath("empty").mkdir(), ["eval", str(t / "empty")])[1], 2, ("empty", "not a run folder")),
    Case("eval-bad-nfe", lambda t: (trained(t), ["eval", str(t / RUN), "--nfe", "one"])[1], 2, ("--nfe",)),
    # -- paper recipes, scaling, official checkpoints -----------------------------------------------------------
    Case("batch-not-divisible-by-accum", base_with("accum = 3\n"), 2, ("train.accum", "train.batch = 8", "3")),
    Case("latents-other-resolution", _latents_of_other_resolution, 2, ("latents128", "holds 128px latents",
                                                                      "data.resolution = 256")),
    Case("latents-other-vae", _latents_of_another_vae, 2, ("other-vae", "has other weights", "data.vae")),
    Case("import-missing-key", lambda t: _import_args(t, lambda sd, torch: sd.pop("network.final_layer.linear.bias")),
         2, ("official.pt", "missing", "final_layer.linear.bias")),
    Case("import-extra-key", lambda t: _import_args(t, lambda sd, torch: sd.update({"network.extra.weight": torch.zeros(2)})),
         2, ("official.pt", "unexpected", "extra.weight")),
    Case("import-not-soflow", lambda t: _import_args(t, lambda sd, torch: [sd.update({k[len("network."):]: sd.pop(k)})
                                                                           for k in list(sd)]),
         2, ("official.pt", "'network.'")),

]


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if any(p == s or s in p.parents for s in skip):
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


def test_the_table_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_named_with_the_right_exit_code(case, tmp_path, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "400")
    args = case.make(work)
    keep = {work / RUN, tmp_path / "cache", work / "runs"}
    before = snapshot(work, keep)
    res = CliRunner().invoke(app, args, prog_name="fewstep")
    lock = getattr(case.make, "_lock", None)
    if lock is not None:
        lock.release()
    text = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == case.code, f"exit {res.exit_code}, output:\n{res.output}\n{res.exception!r}"
    for s in case.says:
        assert s in text, f"{s!r} not in:\n{res.output}"
    assert "Traceback" not in res.output and "internal error" not in res.output
    assert not (work / "EVIL_RAN").exists() and not Path("EVIL_RAN").exists()
    assert snapshot(work, keep) == before, "something outside the run folder changed"
    assert not (work / "runs").exists() or case.id == "set-name-escape"


def test_docs_list_every_case():
    text = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/reliability.md does not list {missing}"
