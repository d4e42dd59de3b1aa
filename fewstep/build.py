"""Build a run's components from a resolved recipe through the registry (no plugin names here).

Whatever a factory raises while building (a shape the backbone cannot take, a plugin's own check of its
options) comes back as a :class:`fewstep.errors.BuildError` that names the recipe table, the plugin and its
package, so that `fewstep check` and `fewstep train` report it in one line before any work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BuildError, FewstepError
from .interfaces import BuildContext, DataSource, Objective, Sampler
from .options import OptionError
from .recipe import Recipe, RecipeError
from .registry import Registry, get_registry

_KIND = {"data": "dataset", "backbone": "backbone", "objective": "objective", "sampler": "sampler"}


@dataclass
class Components:
    data: DataSource
    net: Any  # torch.nn.Module
    objective: Objective
    sampler: Sampler
    ctx: BuildContext


def build_one(reg: Registry, recipe: Recipe, table: str, ctx: BuildContext) -> Any:
    """Build the plugin of one recipe table; any failure becomes a BuildError naming table, plugin and package."""
    comp = recipe.component(table)
    spec = reg.get(_KIND[table], comp.name)
    try:
        return spec.build(ctx, **comp.options)
    except OptionError as exc:  # a constraint the factory checks (between options, or against the data)
        key = f"{table}.{exc.key}" if exc.key else table
        raise RecipeError(recipe.source, key, f"{exc.message} ({spec.kind} {comp.name!r})", exc.suggestion) from exc
    except FewstepError as exc:
        if isinstance(exc, BuildError):
            raise
        raise BuildError(f"{recipe.source}: [{table}] {spec.kind} {comp.name!r}: {exc}") from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the plugin's message, with where it came from
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"{recipe.source}: [{table}] {spec.kind} {comp.name!r} (package {spec.package}) cannot be "
                         f"built from these options: {type(exc).__name__}: {msg}") from exc


def declared_conditions(net: Any) -> tuple[str, ...]:
    """The extra conditions a backbone declares (`conditions`: a tuple of names, or a mapping keyed by name)."""
    cond = getattr(net, "conditions", ()) or ()
    return tuple(cond.keys()) if isinstance(cond, dict) else tuple(cond)


def check_conditions(recipe: Recipe, spec: Any, net: Any) -> None:
    """The data's extra per-row conditions must be ones the backbone takes."""
    missing = [k for k in getattr(spec, "cond_shapes", {}) if k not in declared_conditions(net)]
    if missing:
        raise BuildError(f"{recipe.source}: [data] {recipe.data.name!r} gives every batch the condition(s) "
                         f"{', '.join(missing)}, which [backbone] {recipe.backbone.name!r} does not take (it takes: "
                         f"{', '.join(declared_conditions(net)) or 'none'}); switch them off in [data] or choose a "
                         f"backbone that takes them")


def extend(recipe: Recipe, objective: Objective, net: Any) -> None:
    """objective.extend(net): the objective's own trained submodules join the backbone (a named error otherwise)."""
    hook = getattr(objective, "extend", None)
    if hook is None:
        return
    try:
        hook(net)
    except FewstepError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"{recipe.source}: [objective] {recipe.objective.name!r} cannot extend [backbone] "
                         f"{recipe.backbone.name!r}: {type(exc).__name__}: {exc}") from exc


def build_components(recipe: Recipe, device: Any = "cpu", registry: Registry | None = None) -> Components:
    import torch

    reg = registry or get_registry()

    base = BuildContext(train_steps=recipe.train["steps"], seed=recipe.train["seed"], device=device)
    data = build_one(reg, recipe, "data", base)
    ctx = BuildContext(data=data.spec, train_steps=base.train_steps, seed=base.seed, device=device)
    torch.manual_seed(recipe.train["seed"])  # identical initial weights on every rank and rerun
    net = build_one(reg, recipe, "backbone", ctx)
    check_conditions(recipe, data.spec, net)
    objective = build_one(reg, recipe, "objective", ctx)
    extend(recipe, objective, net)
    try:
        net = net.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise BuildError(f"{recipe.source}: [backbone] {recipe.backbone.name!r} cannot be moved to {device}: {exc}") from exc
    sampler = build_one(reg, recipe, "sampler", ctx)
    return Components(data, net, objective, sampler, ctx)


def check_components(recipe: Recipe, registry: Registry | None = None) -> dict[str, Any]:
    """What `fewstep check` verifies beyond the recipe's values: every component builds, and the backbone
    (built on the meta device: no memory, no time) maps one sample of the data's shape to that shape, and the
    evaluators of eval.after_train accept the data.

    Returns facts for the report: data shape and classes, parameter count.
    """
    import torch

    from .engine.distributed import resolve_device

    reg = registry or get_registry()
    try:
        resolve_device(recipe.train["device"])
    except FewstepError as exc:
        raise BuildError(f"{recipe.source}: train.device: {exc}") from None
    base = BuildContext(train_steps=recipe.train["steps"], seed=recipe.train["seed"], device=torch.device("cpu"))
    data = build_one(reg, recipe, "data", base)
    spec = data.spec
    ctx = BuildContext(data=spec, train_steps=base.train_steps, seed=base.seed, device=torch.device("cpu"))
    with torch.device("meta"):
        net = build_one(reg, recipe, "backbone", ctx)
    check_conditions(recipe, spec, net)
    objective = build_one(reg, recipe, "objective", ctx)
    with torch.device("meta"):
        extend(recipe, objective, net)
    build_one(reg, recipe, "sampler", ctx)
    x = torch.zeros((2, *spec.shape), device="meta")
    t = torch.full((2,), 0.5, device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta") if spec.num_classes > 0 else None
    cond = {k: torch.zeros((2, *shape), device="meta") for k, shape in spec.cond_shapes.items()}
    try:
        with torch.no_grad():
            out = net(x, t, t, y, **cond)
    except NotImplementedError:  # an op without a meta kernel: the build itself succeeded, which is what we can say
        out = None
    except Exception as exc:  # noqa: BLE001 - a shape the backbone cannot take
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"{recipe.source}: [backbone] {recipe.backbone.name!r} cannot take the data of "
                         f"[data] {recipe.data.name!r} (one sample is {tuple(spec.shape)}): {type(exc).__name__}: {msg}") from None
    if out is not None and tuple(out.shape) != tuple(x.shape):
        raise BuildError(f"{recipe.source}: [backbone] {recipe.backbone.name!r} maps data of shape {tuple(x.shape[1:])} "
                         f"to {tuple(out.shape[1:])}; a backbone must return the shape of its input")
    if recipe.eval["after_train"]:  # train builds them before its first step; check reports what train would
        from .evaluation import build_evaluators

        build_evaluators(recipe.eval["after_train"], recipe_eval=recipe.eval, registry=reg, ctx=ctx)
    return {"shape": tuple(spec.shape), "classes": spec.num_classes,
            "parameters": sum(p.numel() for p in net.parameters())}


def build_evaluator(name: str, ctx: BuildContext, options: dict[str, Any] | None = None,
                    registry: Registry | None = None) -> Any:
    reg = registry or get_registry()
    spec = reg.get("evaluator", name)
    return spec.build(ctx, **spec.options.resolve(options or {}))
