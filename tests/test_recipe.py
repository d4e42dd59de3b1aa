"""Recipe validation: every error names the file, the key and the nearest valid spelling, before any work."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.recipe import RecipeError, load_recipe, parse_override
from conftest import write_recipe


write = write_recipe  # write(tmp_path, name, text) -> path


BASE = """
    [data]
    name = "digits"
    [backbone]
    name = "dit"
    size = "T/2"
    [objective]
    name = "fm"
    [train]
    steps = 10
"""


def error_of(path, overrides=()):
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, list(overrides))
    return exc.value


def test_valid_recipe_fills_defaults_and_default_sampler(tmp_path):
    r = load_recipe(write(tmp_path, "ok.toml", BASE))
    assert r.name == "ok"
    assert r.sampler.name == "ode"  # the objective's default sampler
    assert r.sampler.options == {"method": "euler", "cfg_scale": 1.0}
    assert r.train["steps"] == 10 and r.train["batch"] == 128 and r.train["betas"] == [0.9, 0.999]
    assert r.backbone.options["size"] == "T/2" and r.backbone.options["attention"] == "fused"


def test_unknown_table_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "bad.toml", BASE + "[trian]\nsteps = 3\n")
    e = error_of(p)
    assert e.file == str(p.resolve()) and e.key == "trian.steps" and e.suggestion == "train"
    assert "did you mean 'train'" in str(e)


def test_unknown_key(tmp_path):
    e = error_of(write(tmp_path, "bad.toml", BASE + "stpes = 4\n"))
    assert e.key == "train.stpes" and e.suggestion == "steps"


def test_unknown_plugin_key(tmp_path):
    e = error_of(write(tmp_path, "bad.toml", BASE.replace('size = "T/2"', 'sise = "T/2"')))
    assert e.key == "backbone.sise" and e.suggestion == "size"


def test_wrong_type_and_range(tmp_path):
    p = write(tmp_path, "r.toml", BASE)
    assert "must be int" in error_of(p, ["train.steps='ten'"]).message
    assert "out of range" in error_of(p, ["train.lr=-1"]).message
    assert "is not one of" in error_of(p, ["train.precision=fp16"]).message
    e = error_of(p, ["backbone.attention=mth"])
    assert e.suggestion == "math"


def test_int_is_accepted_where_float_is_declared(tmp_path):
    r = load_recipe(write(tmp_path, "r.toml", BASE), ["train.lr=1"])
    assert r.train["lr"] == 1.0 and isinstance(r.train["lr"], float)


def test_unknown_plugin_suggests_nearest(tmp_path):
    e = error_of(write(tmp_path, "r.toml", BASE), ["objective.name=fn"])
    assert e.key == "objective.name" and e.suggestion == "fm" and e.file == "--set"


def test_extends_inherits_overrides_and_reports_the_right_file(tmp_path):
    write(tmp_path, "base.toml", BASE)
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n[train]\nbatch = 4\n')
    r = load_recipe(child)
    assert r.train["steps"] == 10 and r.train["batch"] == 4 and r.name == "child"
    bad_child = write(tmp_path, "bad_child.toml", 'extends = "base.toml"\n[train]\nbtach = 4\n')
    e = error_of(bad_child)
    assert e.file == str(bad_child.resolve()) and e.suggestion == "batch"


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    assert "circular" in error_of(tmp_path / "a.toml").message


def test_switching_plugin_drops_the_parents_plugin_keys(tmp_path):
    """A child that names another plugin for a table starts that table afresh: the parent's plugin-specific keys
    (fm's label_drop, ode's method) would be unknown keys of the new plugin."""
    write(tmp_path, "base.toml", BASE.replace('name = "fm"', 'name = "fm"\nlabel_drop = 0.2')
          + '[sampler]\nname = "ode"\nmethod = "heun"\n')
    same = write(tmp_path, "same.toml", 'extends = "base.toml"\n[objective]\nname = "fm"\n')
    r = load_recipe(same)  # same plugin: the parent's keys are kept
    assert r.objective.options["label_drop"] == 0.2 and r.sampler.options["method"] == "heun"
    child = write(tmp_path, "c.toml", 'extends = "base.toml"\n[objective]\nname = "soflow"\np = 0.5\n'
                                      '[sampler]\nname = "soflow"\n')
    r = load_recipe(child)  # by extends
    assert r.objective.name == "soflow" and r.objective.options["p"] == 0.5 and "label_drop" not in r.objective.options
    assert r.sampler.name == "soflow" and "method" not in r.sampler.options
    r = load_recipe(tmp_path / "base.toml", ["objective.name=meanflow", "sampler.name=meanflow"])  # by --set
    assert r.objective.name == "meanflow" and "label_drop" not in r.objective.options and r.sampler.options == {}
    # a key set after the switch survives it
    r = load_recipe(tmp_path / "base.toml", ["objective.name=soflow", "objective.p=0.25"])
    assert r.objective.options["p"] == 0.25


def shipped_recipes() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    found = sorted((root / "recipes").glob("*.toml")) + sorted((root / "examples").rglob("recipes/*.toml"))
    assert len(found) >= 10
    return found


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.name)
def test_every_shipped_recipe_passes_check(path, monkeypatch, tmp_path):
    """`fewstep check` accepts every recipe in recipes/ and examples/ (an example's recipe with its package
    registered in-process when it is not installed: CI installs the example after the core tests)."""
    from fewstep.registry import Registry, set_registry

    parts = path.parts
    if "examples" in parts:
        pkg_root = Path(*parts[:parts.index("examples") + 2])
        monkeypatch.syspath_prepend(str(pkg_root / "src"))
        reg = Registry()
        if not any(spec.package == pkg_root.name for spec in reg.all()):  # the example is not installed
            import importlib

            reg.register_plugin(importlib.import_module(pkg_root.name.replace("-", "_")), name=pkg_root.name)
        set_registry(reg)
    sets = []
    data = load_recipe(path).data  # paper recipes name a data folder the user has: check them on a made-up one
    if data.name in ("cifar10", "latents"):
        from fakes import fake_cifar_root, fake_latents

        root = tmp_path / "data"
        px = int(data.options.get("resolution", 256)) if data.name == "latents" else 0
        made = fake_cifar_root(root) if data.name == "cifar10" else fake_latents(root, shape=(4, px // 8, px // 8),
                                                                                 resolution=px)
        sets = ["--set", f"data.root={made}"]
        vae = data.options.get("vae") if data.name == "latents" else None
        if vae and str(vae).startswith("/"):  # a VAE folder the user makes (bench_latents_xl2): the cache's hub name
            sets += ["--set", "data.vae=stabilityai/sd-vae-ft-mse"]
    res = CliRunner().invoke(app, ["check", str(path), *sets], prog_name="fewstep")
    assert res.exit_code == 0, res.output


def test_parse_override_uses_toml_grammar():
    assert parse_override("train.lr=1e-4") == ("train", "lr", 1e-4)
    assert parse_override("train.ema=[0.9, 0.99]") == ("train", "ema", [0.9, 0.99])
    assert parse_override("objective.name=soflow") == ("objective", "name", "soflow")
    assert parse_override("train.compile=true") == ("train", "compile", True)
    assert parse_override("train.steps=1_000") == ("train", "steps", 1000)


def test_cli_check_error_exit_code_2_without_traceback(tmp_path):
    p = write(tmp_path, "bad.toml", BASE + "[trian]\nsteps = 3\n")
    res = CliRunner().invoke(app, ["check", str(p)], prog_name="fewstep")
    assert res.exit_code == 2
    text = res.output
    assert "trian.steps" in text and "did you mean 'train'" in text and "bad.toml" in text
    assert "Traceback" not in text


def test_cli_check_prints_resolved_recipe(tmp_path):
    p = write(tmp_path, "ok.toml", BASE)
    res = CliRunner().invoke(app, ["check", str(p), "--set", "train.batch=32"], prog_name="fewstep")
    assert res.exit_code == 0, res.output
    assert "batch = 32" in res.output and 'method = "euler"' in res.output
    assert not (tmp_path / "runs").exists()


def test_every_train_and_eval_option_is_documented():
    from pathlib import Path

    from fewstep.recipe import EVAL_OPTIONS, TRAIN_OPTIONS

    doc = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    for opt in TRAIN_OPTIONS.options + EVAL_OPTIONS.options:
        assert f"| `{opt.name}` |" in doc, f"docs/recipes.md does not document {opt.name}"
