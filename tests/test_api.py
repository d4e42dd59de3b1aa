"""The public plugin API (fewstep.api), the plugin author's guide (docs/plugins.md) and the example
third-party package (examples/fewstep-shortcut), which must use nothing of fewstep but fewstep.api.

None of these tests needs the example package installed: its sources are parsed, not imported.
"""
import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import fewstep
import fewstep.api as api
from fewstep import hookspecs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fewstep-shortcut"
GUIDE = ROOT / "docs" / "plugins.md"

# the names the guide promises a plugin author (a subset of __all__)
PROMISED = {
    "hookimpl", "Option", "BuildContext", "DataSpec", "Batch", "LossOutput", "Objective", "Sampler", "DataSource",
    "Evaluator", "TensorSource", "index_stream", "interpolate", "velocity", "expand_like", "logit_normal",
    "capture_rng", "restore_rng", "has_active_dropout", "PLUGIN_API_VERSION",
}


# ======================================================================================
# fewstep.api
# ======================================================================================

def test_every_public_name_resolves():
    assert len(set(api.__all__)) == len(api.__all__)
    assert PROMISED <= set(api.__all__)
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    assert set(api.__all__) <= set(dir(api))
    # the same objects as their defining modules, not copies
    from fewstep import data, interfaces, options, path, rng
    from fewstep.engine import trainer
    assert api.hookimpl is fewstep.hookimpl and api.Option is options.Option and api.Objective is interfaces.Objective
    assert api.interpolate is path.interpolate and api.velocity is path.velocity and api.TensorSource is data.TensorSource
    assert api.capture_rng is rng.capture_rng and api.Trainer is trainer.Trainer
    assert api.PLUGIN_API_VERSION == 1
    with pytest.raises(AttributeError, match="no attribute 'Trainr'"):
        api.Trainr  # noqa: B018


def test_import_api_does_not_import_torch():
    code = (
        "import sys\n"
        "import fewstep.api as api\n"
        "api.Option, api.Objective, api.Registry, api.hookimpl, api.recipe_from_dict, api.PLUGIN_API_VERSION\n"
        "assert 'torch' not in sys.modules, 'import fewstep.api imported torch'\n"
        "api.interpolate\n"
        "assert 'torch' in sys.modules, 'lazy names must still resolve'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr + out.stdout


# ======================================================================================
# the example package uses nothing of fewstep but fewstep.api
# ======================================================================================

FACTORY_INTO_FEWSTEP = re.compile(r"fewstep(_plugins)?(\.\w+)*:\w+(\.\w+)*")


def example_sources() -> list[Path]:
    skip = {"build", "dist", ".eggs", "__pycache__"}
    return sorted(p for p in EXAMPLE.rglob("*.py") if not skip & set(p.relative_to(EXAMPLE).parts))


def fewstep_references(path: Path):
    """(line, what) for every import of a fewstep module and every string that points into fewstep."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "fewstep":  # `from fewstep import api` is fewstep.api; `... import hookimpl` is not
                for alias in node.names:
                    yield node.lineno, f"fewstep.{alias.name}"
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and FACTORY_INTO_FEWSTEP.fullmatch(node.value):
            yield node.lineno, node.value  # a lazy factory into fewstep's internals


def test_example_imports_nothing_from_fewstep_but_the_api():
    files = example_sources()
    names = {p.relative_to(EXAMPLE).as_posix() for p in files}
    assert {"src/fewstep_shortcut/__init__.py", "src/fewstep_shortcut/objective.py", "src/fewstep_shortcut/sampler.py",
            "tests/test_shortcut.py"} <= names
    bad, used_api = [], set()
    for path in files:
        for line, what in fewstep_references(path):
            if what.split(".")[0].split(":")[0] not in ("fewstep", "fewstep_plugins"):
                continue  # torch, fewstep_shortcut, ...
            if what == "fewstep.api":
                used_api.add(path.name)
            else:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not bad, "the example may use fewstep.api only:\n" + "\n".join(bad)
    assert {"__init__.py", "objective.py", "sampler.py"} <= used_api


def test_builtin_plugins_import_nothing_from_fewstep_but_the_api():
    """The built-ins are written exactly like third-party plugins: fewstep.api is their only door into fewstep
    (their own package, fewstep_plugins.*, is theirs to use)."""
    files = sorted(p for p in (ROOT / "plugins").rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 20
    bad, used_api = [], set()
    for path in files:
        for line, what in fewstep_references(path):
            top = what.split(".")[0].split(":")[0]
            if top != "fewstep":
                continue  # torch, fewstep_plugins (their own package), ...
            if what == "fewstep.api":
                used_api.add(path)
            else:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not bad, "built-in plugins may use fewstep.api only:\n" + "\n".join(bad)
    assert len(used_api) > 20


def test_example_registers_through_the_entry_point_group_only():
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "fewstep-shortcut"
    assert meta["project"]["entry-points"] == {"fewstep": {"shortcut": "fewstep_shortcut"}}


# ======================================================================================
# docs/plugins.md
# ======================================================================================

def hooks() -> dict[str, str]:
    """hook name -> its exact signature, e.g. 'register_objectives(register)'."""
    found = {name: f"{name}{inspect.signature(fn)}" for name, fn in vars(hookspecs).items()
             if callable(fn) and hasattr(fn, "fewstep_spec")}
    assert len(found) == 7, found
    return found


def test_guide_has_a_heading_per_hook_with_its_exact_signature():
    headings = [line for line in GUIDE.read_text().splitlines() if re.match(r"#{1,6}\s", line)]
    missing = [sig for sig in hooks().values()
               if not any(re.fullmatch(rf"#{{1,6}}\s+`?{re.escape(sig)}`?\s*", h) for h in headings)]
    assert not missing, f"docs/plugins.md needs a heading per hook, written as its signature: {missing}"


def test_guide_names_every_public_name():
    text = GUIDE.read_text()
    missing = [name for name in api.__all__ if f"`{name}`" not in text]
    assert not missing, f"docs/plugins.md does not mention {missing}"


BLOCK = re.compile(r"<!-- (file: (?P<path>[^ ]+)|snippet) -->\n```\w*\n(?P<code>.*?)```", re.S)


def guide_blocks() -> tuple[dict[str, str], list[str]]:
    """The guide's marked code blocks: {relative path: text} (repeated paths append) and the snippets."""
    files: dict[str, str] = {}
    snippets: list[str] = []
    for m in BLOCK.finditer(GUIDE.read_text()):
        if m["path"]:
            files[m["path"]] = files.get(m["path"], "") + m["code"]
        else:
            snippets.append(m["code"])
    return files, snippets


@pytest.fixture
def guide_tree(tmp_path, monkeypatch):
    """The guide's files written out under tmp_path and importable; their modules are forgotten afterwards."""
    files, _ = guide_blocks()
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "my_pkg" / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.split(".")[0] in ("my_pkg", "fewstep_toyfm")]:
        del sys.modules[mod]


def test_guide_blocks_are_there():
    files, snippets = guide_blocks()
    assert {"pyproject.toml", "fewstep_toyfm/__init__.py", "fewstep_toyfm/objective.py", "fewstep_toyfm/sampler.py",
            "tests/test_toyfm.py", "my_pkg/nets.py", "my_pkg/data.py", "my_pkg/metrics.py",
            "my_pkg/loggers.py"} <= set(files)
    assert len(snippets) == 7
    meta = tomllib.loads(files["pyproject.toml"])
    assert meta["project"]["entry-points"]["fewstep"] == {"toyfm": "fewstep_toyfm"}


def test_guide_hook_snippets_register_and_their_components_work(guide_tree):
    from fewstep.api import Batch, BuildContext, Registry, Trainer, recipe_from_dict

    _, snippets = guide_blocks()
    reg = Registry(only=["fewstep"])
    for i, code in enumerate(snippets):
        module = types.ModuleType(f"guide_snippet_{i}")
        exec(compile(code, f"docs/plugins.md snippet {i}", "exec"), module.__dict__)
        reg.register_plugin(module, name=f"guide-snippet-{i}")
    mine = {(s.kind, s.name) for s in reg.all() if s.package == "(in-process)"}
    assert mine == {("objective", "toyfm"), ("sampler", "toyeuler"), ("backbone", "tinymlp"), ("dataset", "bars"),
                    ("evaluator", "pixel-stats"), ("logger", "csv")} and not reg.failures
    for kind, name in mine:
        reg.get(kind, name).load()  # every lazy factory resolves

    def build(kind, name, ctx, **options):
        spec = reg.get(kind, name)
        return spec.build(ctx, **spec.options.resolve(options))

    data = build("dataset", "bars", BuildContext(), num=64)
    assert data.spec.shape == (1, 8, 8) and data.spec.num_classes == 2
    one = next(data.batches(8, seed=1, start_step=3))
    halves = [next(data.batches(4, seed=1, start_step=3, rank=r, world=2)) for r in (0, 1)]
    assert torch.equal(one.x, torch.cat([h.x for h in halves]))  # the data contract, through TensorSource
    ctx = BuildContext(data=data.spec)
    net = build("backbone", "tinymlp", ctx, width=16)
    t = torch.rand(8)
    assert net(one.x, t, t / 2, one.y).shape == one.x.shape and net(one.x, t, t, None).shape == one.x.shape
    obj = build("objective", "toyfm", ctx)
    assert torch.isfinite(obj.loss(net, Batch(one.x, one.y), 0).loss)
    assert build("sampler", "toyeuler", ctx).sample(obj, net, torch.randn(4, 1, 8, 8), one.y[:4], nfe=2).shape == (4, 1, 8, 8)
    ev = build("evaluator", "pixel-stats", BuildContext())
    u8 = (torch.rand(16, 3, 8, 8) * 255).to(torch.uint8)
    assert set(ev.evaluate(u8, u8, nfe=1)) == {"mean_gap", "std_gap"} and ev.record["nfe"] == 1

    # a run made only of the guide's components
    recipe = recipe_from_dict({"data": {"name": "bars", "num": 64}, "backbone": {"name": "tinymlp", "width": 16},
                               "objective": {"name": "toyfm"},
                               "train": {"steps": 3, "batch": 8, "device": "cpu", "log_every": 1, "loggers": ["jsonl", "csv"]},
                               "loggers": {"csv": {"file": "m.csv"}}, "eval": {"nfe": [1], "grid": 4}}, registry=reg)
    assert recipe.sampler.name == "toyeuler"
    assert Trainer(recipe, guide_tree / "run", show_progress=False, registry=reg).run().step == 3
    import csv
    import json
    with open(guide_tree / "run" / "m.csv") as fh:  # the guide's logger saw exactly what metrics.jsonl holds
        rows = list(csv.DictReader(fh))
    lines = [json.loads(x) for x in (guide_tree / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [x["step"] for x in lines] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == pytest.approx([x["loss"] for x in lines], rel=1e-12)

    app = typer.Typer()

    @app.callback()
    def _root():
        """fewstep (test app)."""

    reg.add_commands(app)
    out = guide_tree / "bars.png"
    res = CliRunner().invoke(app, ["bars-preview", "--out", str(out), "--num", "8"])
    assert res.exit_code == 0 and out.is_file() and not reg.failures, res.output


def test_guide_complete_example_and_its_tests_pass(guide_tree):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEWSTEP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(guide_tree), env.get("PYTHONPATH", "")])
    light = "import sys, fewstep_toyfm; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, env=env, cwd=guide_tree)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_toyfm.py"],
                         capture_output=True, text=True, env=env, cwd=guide_tree)
    assert out.returncode == 0 and "3 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]

