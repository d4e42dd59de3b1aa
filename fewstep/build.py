"""Build a run's components from a resolved recipe through the registry (no plugin names here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .interfaces import BuildContext, DataSource, Objective, Sampler
from .recipe import Recipe
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
    base = BuildContext(train_steps=recipe.train["steps"], seed=recipe.train["seed"], device=device)
    data = reg.get("dataset", recipe.data.name).build(base, **recipe.data.options)
    ctx = BuildContext(data=data.spec, train_steps=base.train_steps, seed=base.seed, device=device)
    torch.manual_seed(recipe.train["seed"])  # identical initial weights on every rank and rerun
    net = reg.get("backbone", recipe.backbone.name).build(ctx, **recipe.backbone.options).to(device)
    objective = reg.get("objective", recipe.objective.name).build(ctx, **recipe.objective.options)
    sampler = reg.get("sampler", recipe.sampler.name).build(ctx, **recipe.sampler.options)
    return Components(data, net, objective, sampler, ctx)


def build_evaluator(name: str, ctx: BuildContext, options: dict[str, Any] | None = None,
                    registry: Registry | None = None) -> Any:
    reg = registry or get_registry()
    spec = reg.get("evaluator", name)
    return spec.build(ctx, **spec.options.resolve(options or {}))
