"""Build a run's components from a resolved recipe through the registry (no plugin names here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .interfaces import BuildContext, DataSource, Objective, Sampler
from .options import OptionError
from .recipe import Recipe, RecipeError
from .registry import Registry, get_registry


@dataclass
class Components:
    data: DataSource
    net: Any  # torch.nn.Module
    objective: Objective
    sampler: Sampler
    ctx: BuildContext


def build_components(recipe: Recipe, device: Any = "cpu", registry: Registry | None = None) -> Components:
    import torch

    reg = registry or get_registry()

    def build(kind: str, table: str, ctx: BuildContext) -> Any:
        comp = recipe.component(table)
        try:
            return reg.get(kind, comp.name).build(ctx, **comp.options)
        except OptionError as exc:  # a constraint the factory checks (between options, or against the data)
            key = f"{table}.{exc.key}" if exc.key else table
            raise RecipeError(recipe.source, key, f"{exc.message} ({kind} {comp.name!r})", exc.suggestion) from exc

    base = BuildContext(train_steps=recipe.train["steps"], seed=recipe.train["seed"], device=device)
    data = build("dataset", "data", base)
    ctx = BuildContext(data=data.spec, train_steps=base.train_steps, seed=base.seed, device=device)
    torch.manual_seed(recipe.train["seed"])  # identical initial weights on every rank and rerun
    net = build("backbone", "backbone", ctx).to(device)
    objective = build("objective", "objective", ctx)
    sampler = build("sampler", "sampler", ctx)
    return Components(data, net, objective, sampler, ctx)


def build_evaluator(name: str, ctx: BuildContext, options: dict[str, Any] | None = None,
                    registry: Registry | None = None) -> Any:
    reg = registry or get_registry()
    spec = reg.get("evaluator", name)
    return spec.build(ctx, **spec.options.resolve(options or {}))
