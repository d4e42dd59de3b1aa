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


def broken_reasons(reg):
    return {f.plugin: (f.package, f.error) for f in reg.failures}


def test_a_plugin_reusing_a_builtin_name_is_broken_and_the_builtin_keeps_working(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_dup", {"dup": "fewstep_dup_mod"}, {"fewstep_dup_mod": """
        import fewstep
        @fewstep.hookimpl
        def register_objectives(register):
            register("fm", "x:y", description="another fm")
            register("dupextra", "x:y", description="also from the broken plugin")
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert reg.get("objective", "fm").package == "fewstep"  # the built-in keeps its name
    package, why = broken_reasons(reg)["dup"]
    assert package == "fewstep_dup" and "'fm'" in why and "'fewstep'" in why and "'fewstep_dup'" in why
    with pytest.raises(RegistryError, match="broken plugin") as exc:  # its other components are withheld, with the reason
        reg.get("objective", "dupextra")
    assert "fewstep_dup" in str(exc.value)


def test_two_third_party_plugins_with_one_component_name_are_both_broken(tmp_path, monkeypatch):
    for dist in ("fewstep_one", "fewstep_two"):
        make_dist(tmp_path, dist, {dist: f"{dist}_mod"}, {f"{dist}_mod": """
            import fewstep
            @fewstep.hookimpl
            def register_samplers(register):
                register("samename", "x:y")
        """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert {"fewstep_one", "fewstep_two"} <= set(broken_reasons(reg))
    with pytest.raises(RegistryError, match="neither gets it"):
        reg.get("sampler", "samename")
    assert reg.get("sampler", "ode")


def test_misspelled_hook_breaks_only_that_plugin(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_typo", {"typo": "fewstep_typo_mod"}, {"fewstep_typo_mod": """
        import fewstep
        @fewstep.hookimpl
        def register_objective(register):
            register("typoobj", "x:y")
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    package, why = broken_reasons(reg)["typo"]
    assert package == "fewstep_typo" and "register_objective" in why and "did you mean 'register_objectives'" in why
    assert reg.get("objective", "fm")


def test_sys_exit_at_import_breaks_only_that_plugin(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_exits", {"exits": "fewstep_exits_mod"}, {"fewstep_exits_mod": "import sys\nsys.exit(3)\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert "SystemExit(3)" in broken_reasons(reg)["exits"][1]
    set_registry(reg)
    res = CliRunner().invoke(app, ["plugins"], prog_name="fewstep")
    assert res.exit_code == 0 and "exits" in res.output and "SystemExit" in res.output and "digits" in res.output


def test_two_packages_with_one_entry_point_name_are_both_named(tmp_path, monkeypatch):
    for dist, obj in (("fewstep_epa", "epa_obj"), ("fewstep_epb", "epb_obj")):
        make_dist(tmp_path, dist, {"samep": f"{dist}_mod"}, {f"{dist}_mod": f"""
            import fewstep
            @fewstep.hookimpl
            def register_objectives(register):
                register("{obj}", "x:y")
        """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    rows = [(f.plugin, f.package) for f in reg.failures]
    assert ("samep", "fewstep_epa") in rows and ("samep", "fewstep_epb") in rows  # neither is silently hidden
    for obj in ("epa_obj", "epb_obj"):
        with pytest.raises(RegistryError, match="uninstall one"):
            reg.get("objective", obj)


def test_a_recipe_naming_a_broken_plugins_component_gets_the_reason(tmp_path, monkeypatch):
    make_dist(tmp_path, "fewstep_dup2", {"dup2": "fewstep_dup2_mod"}, {"fewstep_dup2_mod": """
        import fewstep
        @fewstep.hookimpl
        def register_objectives(register):
            register("fm", "x:y")
            register("mine", "x:y")
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    set_registry(Registry())
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nname = "digits"\n[backbone]\nname = "dit"\n[objective]\nname = "mine"\n')
    res = CliRunner().invoke(app, ["check", str(recipe)], prog_name="fewstep")
    assert res.exit_code == 2 and "broken plugin" in res.output and "fewstep_dup2" in res.output
    assert "Traceback" not in res.output


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


def test_a_plugin_command_typer_cannot_build_is_dropped_and_the_cli_works(tmp_path, monkeypatch):
    import typer

    make_dist(tmp_path, "fewstep_badcmd", {"badcmd": "fewstep_badcmd_mod"}, {"fewstep_badcmd_mod": """
        import fewstep
        @fewstep.hookimpl
        def register_commands(app):
            @app.command("oops")
            def oops(x: int | str):  # Typer cannot build a Union parameter
                pass
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    test_app = typer.Typer()

    @test_app.command()
    def hello():
        print("hi")

    @test_app.command()
    def other():
        pass

    reg.add_commands(test_app)
    names = [c.callback.__name__ for c in test_app.registered_commands]
    assert names[:2] == ["hello", "other"] and "oops" not in names  # built-in plugin commands may follow
    assert any(f.plugin == "badcmd" and "register_commands" in f.error for f in reg.failures)
    assert CliRunner().invoke(test_app, ["hello"]).output.strip() == "hi"
