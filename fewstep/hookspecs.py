"""The hooks a fewstep plugin implements.

Every hook receives a ``register`` callback and calls it once per component::

    @fewstep.hookimpl
    def register_objectives(register):
        register("soflow", "my_pkg.soflow:SoFlow", options=[...],
                 description="...", default_sampler="soflow")

The factory is given as a lazy ``"module:attr"`` string (or the object itself),
so that listing plugins and validating recipes never imports torch. The module
that holds the hook implementations must import only the standard library and
fewstep's light modules (``fewstep.options``, ``fewstep.hookspecs``).

Factories are called as ``factory(ctx, **options)`` with a
:class:`fewstep.interfaces.BuildContext` and the validated options.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("fewstep")
hookimpl = pluggy.HookimplMarker("fewstep")


@hookspec
def register_backbones(register):
    """Register networks ``net(x, t, s, y) -> Tensor`` shaped like x (factory(ctx, **options) -> nn.Module)."""


@hookspec
def register_objectives(register):
    """Register training objectives (factory(ctx, **options) -> fewstep.interfaces.Objective)."""


@hookspec
def register_samplers(register):
    """Register samplers (factory(ctx, **options) -> fewstep.interfaces.Sampler)."""


@hookspec
def register_evaluators(register):
    """Register evaluators (factory(ctx, **options) -> fewstep.interfaces.Evaluator)."""


@hookspec
def register_datasets(register):
    """Register data sources (factory(ctx, **options) -> fewstep.interfaces.DataSource)."""


@hookspec
def register_loggers(register):
    """Register experiment loggers (factory(ctx, **options) -> fewstep.interfaces.Logger): sinks for the resolved
    recipe, scalars, images and the summary of a run, chosen by a recipe's ``train.loggers``."""


@hookspec
def register_commands(app):
    """Add commands to the CLI: ``app`` is the Typer app (call ``app.command()`` / ``app.add_typer()``)."""
