"""What the benchmark scripts share: fewstep's built-in plugins registered in-process (the scripts work without
installing fewstep) and `name:key=value` objective overrides. (From benchmarks/step_time.py, which
`fewstep bench` replaced.)"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def registry(names=("dit", "fm", "soflow", "meanflow", "ect")):
    import importlib
    import types

    sys.path.insert(0, str(ROOT))
    if "fewstep_plugins" not in sys.modules:  # the plugins/ folder is the fewstep_plugins package
        pkg = types.ModuleType("fewstep_plugins")
        pkg.__path__ = [str(ROOT / "plugins")]
        sys.modules["fewstep_plugins"] = pkg
    from fewstep.registry import Registry

    reg = Registry(load_entrypoints=False)
    for name in names:
        reg.register_plugin(importlib.import_module(f"fewstep_plugins.{name}"), name=name, package="fewstep")
    return reg


def parse_objective(text: str):
    name, *pairs = text.split(":")
    opts = {}
    for pair in pairs:
        k, _, v = pair.partition("=")
        from fewstep.recipe import parse_override

        opts[k] = parse_override(f"x.{k}={v}")[2]
    return name, opts
