"""fewstep's public plugin API: every name a plugin (and its tests) may import from fewstep.

A third-party plugin imports from ``fewstep.api`` only; everything else in fewstep is internal and
may change without notice. The guide is ``docs/plugins.md``.

Versioning: :data:`PLUGIN_API_VERSION` names the version of this API. Adding a name, an optional
argument or an optional hook keeps it; removing or renaming a name, changing a signature or a
contract (``fewstep/interfaces.py``) in a way that breaks existing plugins bumps it. A plugin may
check it when its registration module is imported and raise ``ImportError`` when it does not
match: fewstep then lists the plugin as broken, with that message, and keeps the others working.

Importing this module does not import torch (``fewstep plugins`` and ``fewstep check`` import
every plugin's registration module and must stay fast). The names that need torch
(:class:`TensorSource`, the path and RNG helpers, :class:`Trainer`, ...) are resolved on first
access through the module-level ``__getattr__`` below.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, UserError
from .hookspecs import hookimpl
from .interfaces import (Batch, BuildContext, DataError, DataSource, DataSpec, Evaluator, ImageStream, Logger, LossOutput,
                         Objective, Sampler)
from .options import Option, OptionError
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .registry import PluginSpec, Registry, RegistryError

#: Version of the plugin API described by this module and docs/plugins.md.
PLUGIN_API_VERSION = 1

# name -> module that defines it; these modules import torch, so they load on first access
_LAZY = {
    # data helpers (fewstep.data)
    "TensorSource": "fewstep.data",
    "index_stream": "fewstep.data",
    "epoch_permutation": "fewstep.data",
    # the probability path x_t = (1 - t) x0 + t e (fewstep.path)
    "interpolate": "fewstep.path",
    "velocity": "fewstep.path",
    "expand_like": "fewstep.path",
    "logit_normal": "fewstep.path",
    # replaying random streams (fewstep.rng)
    "capture_rng": "fewstep.rng",
    "restore_rng": "fewstep.rng",
    "has_active_dropout": "fewstep.rng",
    # images (fewstep.images): what DataSource.save_preview and the evaluators use
    "to_uint8": "fewstep.images",
    "save_grid": "fewstep.images",
    # a run's weights (fewstep.engine.checkpoint): warm starts, teachers
    "load_run_ema": "fewstep.engine.checkpoint",
    # a run folder from weights made elsewhere (importers of official checkpoints)
    "write_run": "fewstep.runs",
    # testing a plugin end to end (fewstep.engine.trainer)
    "Trainer": "fewstep.engine.trainer",
}

__all__ = [
    "PLUGIN_API_VERSION",
    # registration
    "hookimpl",
    "Option",
    "OptionError",
    # contracts
    "BuildContext",
    "DataSpec",
    "Batch",
    "LossOutput",
    "Objective",
    "Sampler",
    "DataSource",
    "DataError",
    "UserError",
    "CheckpointError",
    "Evaluator",
    "ImageStream",
    "Logger",
    # testing and tooling
    "Registry",
    "RegistryError",
    "PluginSpec",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "recipe_from_dict",
    # lazy (torch)
    *_LAZY,
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come through __getattr__
    from .data import TensorSource, epoch_permutation, index_stream
    from .engine.checkpoint import load_run_ema
    from .engine.trainer import Trainer
    from .runs import write_run
    from .images import save_grid, to_uint8
    from .path import expand_like, interpolate, logit_normal, velocity
    from .rng import capture_rng, has_active_dropout, restore_rng


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fewstep.api' has no attribute {name!r}; the public names are "
                             f"listed in fewstep.api.__all__")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
