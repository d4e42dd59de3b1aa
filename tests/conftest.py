import os

os.environ.setdefault("COLUMNS", "200")  # stable rich/typer wrapping in CLI tests

import pytest
import torch

from fewstep.recipe import recipe_from_dict
from fewstep.registry import Registry, set_registry


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test starts from the installed entry points, and in-process registrations never leak."""
    set_registry(None)
    yield
    set_registry(None)


@pytest.fixture
def registry():
    reg = Registry()
    set_registry(reg)
    return reg


def write_recipe(folder, name, text):
    """Write a recipe given as indented TOML text to folder/name; return the path."""
    import textwrap

    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


def tiny_dict(**tables):
    """A recipe small enough to train a few steps on CPU in about a second."""
    d = {
        "name": "tiny",
        "data": {"name": "digits", "limit": 64},
        "backbone": {"name": "dit", "size": "T/2", "hidden": 32, "depth": 1, "heads": 2},
        "objective": {"name": "fm"},
        "train": {"steps": 6, "batch": 8, "lr": 1e-3, "log_every": 1, "ema": [0.9, 0.5], "seed": 3},
        "eval": {"nfe": [1], "grid": 4},
    }
    for table, values in tables.items():
        if values is None:
            d.pop(table, None)
        elif isinstance(values, dict) and isinstance(d.get(table), dict):
            d[table] = {**d[table], **values}
        else:
            d[table] = values
    return d


@pytest.fixture
def tiny():
    def make(**tables):
        return recipe_from_dict(tiny_dict(**tables))

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- built-in components with their declared defaults ------------------------------------------------------------
# Factories take keyword-only options without defaults (the declarations are the one place a default lives), so
# tests that build a component directly go through the registry: builtin("objective", "soflow")(ctx, p=0.75).
_BUILTINS = None


def builtin(kind, name):
    def make(ctx, **overrides):
        global _BUILTINS
        if _BUILTINS is None:
            _BUILTINS = Registry()
        return _BUILTINS.get(kind, name).create(ctx, **overrides)

    make.__name__ = f"{kind}:{name}"
    return make


def make_dit(in_channels, image_size, num_classes, **overrides):
    """A DiT for (in_channels, image_size, image_size) data with `num_classes` classes."""
    from fewstep.interfaces import BuildContext, DataSpec

    ctx = BuildContext(data=DataSpec((in_channels, image_size, image_size), num_classes))
    return builtin("backbone", "dit")(ctx, **overrides)
