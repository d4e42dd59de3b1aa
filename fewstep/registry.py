"""Plugin registry: one pluggy PluginManager fed by the ``fewstep`` entry-point group.

Built-in plugins come through the same entry points as third-party ones; the
core never imports a plugin by name. A plugin that fails to import (or whose
hook raises) is recorded with its error and the others keep working. Two
plugins registering the same (kind, name) is an error naming both packages.

Environment:
    FEWSTEP_LOAD_PLUGINS   comma-separated entry-point names or distribution names
                           to load (empty string: none); unset loads all.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .options import Option, OptionSet, nearest

KINDS = ("backbone", "objective", "sampler", "evaluator", "dataset")
_HOOK_OF_KIND = {
    "backbone": "register_backbones",
    "objective": "register_objectives",
    "sampler": "register_samplers",
    "evaluator": "register_evaluators",
    "dataset": "register_datasets",
}


class RegistryError(RuntimeError):
    """A registry problem the user must fix (duplicate names, unknown plugins)."""


@dataclass
class PluginSpec:
    """One registered component: what it is, who provides it, and how to build it."""

    kind: str
    name: str
    factory: Any  # "module:attr" string or a callable
    description: str = ""
    options: OptionSet = field(default_factory=OptionSet)
    plugin: str = ""  # the pluggy plugin (entry-point) name
    package: str = ""  # distribution that provides it ("(in-process)" for test registrations)
    version: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Callable[..., Any]:
        """Import and return the factory (the only place a plugin's heavy code is imported)."""
        if callable(self.factory):
            return self.factory
        module_name, _, attr = str(self.factory).partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - re-raised with the plugin named
            raise RegistryError(
                f"{self.kind} {self.name!r} from package {self.package!r} failed to load "
                f"{self.factory!r}: {type(exc).__name__}: {exc}"
            ) from exc
        return obj

    def build(self, ctx: Any, **options: Any) -> Any:
        """Call the factory with `options` as given (a recipe's resolved table: every declared option)."""
        return self.load()(ctx, **options)

    def create(self, ctx: Any, **overrides: Any) -> Any:
        """Build with the declared defaults filled in and `overrides` validated (notebooks, tests):
        the declarations are the one place a default lives; factories take no defaults of their own."""
        return self.build(ctx, **self.options.resolve(overrides))

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "plugin": self.plugin,
            "description": self.description,
            "options": {o.name: {"type": o.type_name, "default": o.default, "help": o.help} for o in self.options.options},
            **({"extras": self.extras} if self.extras else {}),
        }


@dataclass
class PluginFailure:
    plugin: str
    package: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} (package {self.package!r}) failed: {self.error}"


def _in_tests() -> bool:
    return bool(os.environ.get("FEWSTEP_NO_ENTRYPOINTS"))


class Registry:
    """Collects what every plugin registers, grouped by kind and name."""

    def __init__(self, load_entrypoints: bool = True, only: Iterable[str] | None = None):
        self.pm = pluggy.PluginManager("fewstep")
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._packages: dict[str, tuple[str, str]] = {}  # plugin name -> (dist, version)
        self._specs: dict[tuple[str, str], PluginSpec] | None = None
        if load_entrypoints and not _in_tests():
            env = os.environ.get("FEWSTEP_LOAD_PLUGINS")
            if only is None and env is not None:
                only = [p.strip() for p in env.split(",") if p.strip()]
            self._load_entrypoints(only)

    # -- loading -------------------------------------------------------------
    def _load_entrypoints(self, only: Iterable[str] | None) -> None:
        wanted = set(only) if only is not None else None
        for ep in sorted(metadata.entry_points(group="fewstep"), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else ""
            if wanted is not None and ep.name not in wanted and dist not in wanted:
                continue
            if self.pm.get_plugin(ep.name) is not None:
                other = self._packages.get(ep.name, ("?", ""))[0]
                self.failures.append(PluginFailure(ep.name, dist, f"entry-point name {ep.name!r} already used by package {other!r}"))
                continue
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
                self.failures.append(PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
                continue
            self._packages[ep.name] = (dist, version)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise RegistryError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc

    def register_plugin(self, plugin: Any, name: str, package: str = "(in-process)") -> None:
        """Register a plugin object in-process (tests, notebooks). Undo with :meth:`unregister_plugin`."""
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._packages[name] = (package, "")
        self._specs = None

    def unregister_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._packages.pop(name, None)
        self._specs = None

    # -- collection ----------------------------------------------------------
    def _collect(self) -> dict[tuple[str, str], PluginSpec]:
        specs: dict[tuple[str, str], PluginSpec] = {}
        broken = {f.plugin for f in self.failures}
        for kind, hook_name in _HOOK_OF_KIND.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                plugin_name = impl.plugin_name
                if plugin_name in broken:
                    continue
                package, version = self._packages.get(plugin_name, ("?", ""))
                found: list[PluginSpec] = []

                def register(name: str, factory: Any, *, options: Iterable[Option] = (), description: str = "",
                             _kind=kind, _plugin=plugin_name, _pkg=package, _ver=version, _found=found, **extras: Any) -> None:
                    _found.append(PluginSpec(_kind, name, factory, description.strip().splitlines()[0] if description else "",
                                             OptionSet(list(options)), _plugin, _pkg, _ver, extras))

                try:
                    impl.function(register=register)
                except Exception as exc:  # noqa: BLE001 - name the plugin, keep the others
                    self.failures.append(PluginFailure(plugin_name, package, f"{hook_name} raised {type(exc).__name__}: {exc}"))
                    broken.add(plugin_name)
                    continue
                for spec in found:
                    key = (spec.kind, spec.name)
                    if key in specs:
                        first = specs[key]
                        raise RegistryError(
                            f"{spec.kind} {spec.name!r} is registered twice: by package {first.package!r} "
                            f"(plugin {first.plugin!r}) and by package {spec.package!r} (plugin {spec.plugin!r})"
                        )
                    specs[key] = spec
        # drop anything registered by a plugin that later turned out broken
        return {k: v for k, v in specs.items() if v.plugin not in broken}

    @property
    def specs(self) -> dict[tuple[str, str], PluginSpec]:
        if self._specs is None:
            self._specs = self._collect()
        return self._specs

    def names(self, kind: str) -> list[str]:
        return sorted(n for (k, n) in self.specs if k == kind)

    def get(self, kind: str, name: str) -> PluginSpec:
        if kind not in KINDS:
            raise RegistryError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
        try:
            return self.specs[(kind, name)]
        except KeyError:
            sugg = nearest(name, self.names(kind))
            hint = f"; did you mean {sugg!r}?" if sugg else f"; registered: {', '.join(self.names(kind)) or 'none'}"
            raise RegistryError(f"no {kind} named {name!r}{hint}") from None

    def all(self) -> list[PluginSpec]:
        return sorted(self.specs.values(), key=lambda s: (KINDS.index(s.kind), s.name))

    def add_commands(self, app: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(app=app)
            except Exception as exc:  # noqa: BLE001
                self.failures.append(PluginFailure(impl.plugin_name, self._packages.get(impl.plugin_name, ("?",))[0],
                                                   f"register_commands raised {type(exc).__name__}: {exc}"))


_DEFAULT: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry()
    return _DEFAULT


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests); None rebuilds it on next use."""
    global _DEFAULT
    _DEFAULT = registry
