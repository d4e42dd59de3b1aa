"""Plugins: built-ins come through entry points; broken plugins are named; duplicates are loud."""
import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import fewstep
from fewstep.cli import app
from fewstep.options import Option
from fewstep.registry import Registry, RegistryError, set_registry


def make_dist(root, dist, entry_points: dict[str, str], modules: dict[str, str]):
    """A hand-made installed distribution (dist-info on sys.path), as pip would leave it."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fewstep]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))


def test_builtins_are_registered_through_entry_points():
    reg = Registry()
    for kind, name in [("backbone", "dit"), ("objective", "fm"), ("sampler", "ode"), ("dataset", "digits")]:
        spec = reg.get(kind, name)
        assert spec.package == "fewstep" and spec.plugin  # came through the entry-point group


def test_hook_register_objectives_in_process():
    class Toy:
        __name__ = "toy"

        @fewstep.hookimpl
        def register_objectives(register):
            register("toy", "fewstep_plugins.fm.objective:FlowMatching", options=[Option("alpha", float, 0.5)],
                     description="a toy", default_sampler="ode")

    reg = Registry()
    reg.register_plugin(Toy, name="toy")
    spec = reg.get("objective", "toy")
    assert spec.package == "(in-process)" and spec.extras["default_sampler"] == "ode"
    assert spec.options.resolve({}) == {"alpha": 0.5}
    reg.unregister_plugin("toy")
    with pytest.raises(RegistryError, match="no objective named 'toy'"):
        reg.get("objective", "toy")


def test_broken_plugin_is_named_and_the_rest_keep_working(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_broken", {"broken": "fewstep_broken_mod"},
              {"fewstep_broken_mod": "raise ImportError('needs libfoo')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert [(f.plugin, f.package) for f in reg.failures] == [("broken", "fewstep_broken")]
    assert "needs libfoo" in reg.failures[0].error
    assert reg.get("objective", "fm").package == "fewstep"

    set_registry(reg)
    res = CliRunner().invoke(app, ["plugins"], prog_name="fewstep")
    assert res.exit_code == 0 and "broken" in res.output and "needs libfoo" in res.output and "digits" in res.output


def test_hook_that_raises_is_named(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_raises", {"raiser": "fewstep_raiser_mod"}, {"fewstep_raiser_mod": """
        import fewstep
        @fewstep.hookimpl
        def register_samplers(register):
            raise RuntimeError("boom")
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert reg.get("sampler", "ode")  # collection succeeds
    assert any(f.plugin == "raiser" and "boom" in f.error for f in reg.failures)


def test_duplicate_name_is_an_error_naming_both_packages(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_dup", {"dup": "fewstep_dup_mod"}, {"fewstep_dup_mod": """
        import fewstep
        @fewstep.hookimpl
        def register_objectives(register):
            register("fm", "x:y", description="another fm")
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError) as exc:
        Registry().get("objective", "fm")
    assert "'fewstep'" in str(exc.value) and "'fewstep_dup'" in str(exc.value)


def test_misspelled_hook_is_rejected(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_typo", {"typo": "fewstep_typo_mod"}, {"fewstep_typo_mod": """
        import fewstep
        @fewstep.hookimpl
        def register_objective(register):
            pass
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError, match="register_objective"):
        Registry()


def test_load_plugins_env_selects_a_subset(monkeypatch):
    monkeypatch.setenv("FEWSTEP_LOAD_PLUGINS", "digits,fm")
    reg = Registry()
    assert reg.names("dataset") == ["digits"] and reg.names("backbone") == []


def test_plugins_json():
    res = CliRunner().invoke(app, ["plugins", "--json"], prog_name="fewstep")
    assert res.exit_code == 0
    data = json.loads(res.output)
    rows = {(p["kind"], p["name"]): p for p in data["plugins"]}
    assert rows[("objective", "fm")]["package"] == "fewstep"
    assert rows[("backbone", "dit")]["options"]["size"]["default"] == "B/2"
    assert data["failures"] == []


def test_cli_help_and_plugins_do_not_import_heavy_packages():
    code = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from fewstep.cli import app
        for args in (["--help"], ["plugins"], ["plugins", "--json"]):
            r = CliRunner().invoke(app, args, prog_name="fewstep")
            assert r.exit_code == 0, r.output
        heavy = [m for m in ("torch", "timm", "diffusers", "torch_fidelity") if m in sys.modules]
        print(heavy)
        assert not heavy, heavy
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
