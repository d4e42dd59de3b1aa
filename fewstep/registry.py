"""Plugin registry: one pluggy PluginManager fed by the ``fewstep`` entry-point group.

Built-in plugins come through the same entry points as third-party ones; the core never imports a plugin
by name. One bad plugin never takes fewstep down: a plugin that fails to import (an exception or a
``sys.exit`` at import), implements a hook that does not exist, raises in a hook, registers a component
name that another package already registers, or shares its entry-point name with another package, is
listed as broken with its package and the reason, and everything else keeps working. A recipe that names
a broken plugin's component gets that reason, not "no such plugin". (Between a built-in and a third-party
package, the built-in keeps the name; between two third-party packages neither gets it.)

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
from .errors import UserError
from .options import Option, OptionSet, nearest

KINDS = ("backbone", "objective", "sampler", "evaluator", "dataset", "logger")
_HOOK_OF_KIND = {
    "backbone": "register_backbones",
    "objective": "register_objectives",
    "sampler": "register_samplers",
    "evaluator": "register_evaluators",
    "dataset": "register_datasets",
    "logger": "register_loggers",
}


class RegistryError(UserError, RuntimeError):
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


BUILTIN_PACKAGE = "fewstep"


class Registry:
    """Collects what every plugin registers, grouped by kind and name."""

    def __init__(self, load_entrypoints: bool = True, only: Iterable[str] | None = None):
        self.pm = pluggy.PluginManager("fewstep")
        self.pm.add_hookspecs(hookspecs)
        self._load_failures: list[PluginFailure] = []  # import / registration
        self._collect_failures: list[PluginFailure] = []  # hooks that raised, clashing names (redone per collection)
        self._packages: dict[str, tuple[str, str]] = {}  # plugin name -> (dist, version)
        self._specs: dict[tuple[str, str], PluginSpec] | None = None
        self._withheld: dict[tuple[str, str], str] = {}  # (kind, name) of a broken plugin -> why
        self._shadow: dict[str, Any] = {}  # broken plugins whose registrations we still want to name
        if load_entrypoints and not _in_tests():
            env = os.environ.get("FEWSTEP_LOAD_PLUGINS")
            if only is None and env is not None:
                only = [p.strip() for p in env.split(",") if p.strip()]
            self._load_entrypoints(only)

    # -- loading -------------------------------------------------------------
    @property
    def failures(self) -> list[PluginFailure]:
        """Every broken plugin with its package and reason (loading and collection)."""
        self.specs  # noqa: B018 - collection may find more
        return self._load_failures + self._collect_failures

    def _fail(self, plugin: str, package: str, error: str) -> None:
        self._load_failures.append(PluginFailure(plugin, package, error))
        self._specs = None

    def _load_entrypoints(self, only: Iterable[str] | None) -> None:
        wanted = set(only) if only is not None else None
        eps = sorted(metadata.entry_points(group="fewstep"), key=lambda e: (e.name, e.dist.name if e.dist else ""))
        by_name: dict[str, list[Any]] = {}
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else "?"
            if wanted is not None and ep.name not in wanted and dist not in wanted:
                continue
            by_name.setdefault(ep.name, []).append(ep)
        for name, group in by_name.items():
            if len({(e.dist.name if e.dist else "?") for e in group}) > 1:  # two packages, one entry-point name
                dists = [e.dist.name if e.dist else "?" for e in group]
                reason = (f"entry-point name {name!r} is used by packages {', '.join(map(repr, dists))}; "
                          f"fewstep cannot tell which is meant: uninstall one of them")
                for ep in group:
                    module = self._import(ep)
                    if module is not None:
                        self._shadow[f"{name}@{ep.dist.name if ep.dist else '?'}"] = (module, ep.dist.name if ep.dist else "?", reason)
                    self._fail(name, ep.dist.name if ep.dist else "?", reason)
                continue
            ep = group[0]
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else ""
            module = self._import(ep)
            if module is None:
                continue
            self._register(module, name, dist, version)

    def _import(self, ep: Any) -> Any:
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            return ep.load()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin must not break the others
            what = f"SystemExit({exc.code!r}) at import" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            self._fail(ep.name, dist, what)
            return None

    def _register(self, plugin: Any, name: str, package: str, version: str) -> bool:
        """Register one plugin; a plugin that implements an unknown hook is unregistered and listed as broken."""
        try:
            self.pm.register(plugin, name=name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - e.g. a bad hookimpl signature
            self._fail(name, package, f"cannot be registered: {type(exc).__name__}: {exc}")
            return False
        unknown = [impl.function.__name__ for caller in self.pm.get_hookcallers(plugin) or []
                   if caller.spec is None for impl in caller.get_hookimpls() if impl.plugin is plugin
                   and not impl.optionalhook]
        if unknown:
            self.pm.unregister(plugin)
            hooks = sorted(n for n in dir(hookspecs) if n.startswith("register_"))
            hints = [f"{u!r}" + (f" (did you mean {nearest(u, hooks)!r}?)" if nearest(u, hooks) else "") for u in unknown]
            self._fail(name, package, f"implements unknown hook {', '.join(hints)}; the hooks are {', '.join(hooks)}")
            self._shadow[name] = (plugin, package, self._load_failures[-1].error)
            return False
        self._packages[name] = (package, version)
        self._specs = None
        return True

    def register_plugin(self, plugin: Any, name: str, package: str = "(in-process)") -> None:
        """Register a plugin object in-process (tests, notebooks). Undo with :meth:`unregister_plugin`."""
        if not self._register(plugin, name, package, ""):
            raise RegistryError(str(self._load_failures[-1]))

    def unregister_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._packages.pop(name, None)
        self._specs = None

    # -- collection ----------------------------------------------------------
    def _registrations(self, plugin_name: str, package: str, version: str, impls: dict[str, Any]) -> list[PluginSpec] | str:
        """What one plugin registers, or the reason it failed."""
        found: list[PluginSpec] = []
        for kind, hook_name in _HOOK_OF_KIND.items():
            fn = impls.get(hook_name)
            if fn is None:
                continue

            def register(name: str, factory: Any, *, options: Iterable[Option] = (), description: str = "",
                         _kind=kind, **extras: Any) -> None:
                found.append(PluginSpec(_kind, name, factory, description.strip().splitlines()[0] if description else "",
                                        OptionSet(list(options)), plugin_name, package, version, extras))

            try:
                fn(register=register)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - name the plugin, keep the others
                return f"{hook_name} raised {type(exc).__name__}: {exc}"
        return found

    def _collect(self) -> dict[tuple[str, str], PluginSpec]:
        per_plugin: dict[str, list[PluginSpec]] = {}
        self._collect_failures = []
        already = {f.plugin for f in self._load_failures}
        for plugin_name, plugin in self.pm.list_name_plugin():
            if plugin is None or plugin_name in already:
                continue
            impls = {caller.name: impl.function for caller in (self.pm.get_hookcallers(plugin) or [])
                     for impl in caller.get_hookimpls() if impl.plugin is plugin}
            package, version = self._packages.get(plugin_name, ("?", ""))
            got = self._registrations(plugin_name, package, version, impls)
            if isinstance(got, str):
                self._collect_failures.append(PluginFailure(plugin_name, package, got))
                continue
            per_plugin[plugin_name] = got
        # one owner per (kind, name): a built-in keeps its name against a third-party package; two third-party
        # packages that register the same name are both broken
        owners: dict[tuple[str, str], list[PluginSpec]] = {}
        for specs in per_plugin.values():
            seen_here: set[tuple[str, str]] = set()
            for spec in specs:
                key = (spec.kind, spec.name)
                if key in seen_here:
                    continue
                seen_here.add(key)
                owners.setdefault(key, []).append(spec)
        broken: dict[str, str] = {}
        for key, specs in owners.items():
            if len(specs) < 2:
                continue
            builtin = [s for s in specs if s.package == BUILTIN_PACKAGE]
            others = [s for s in specs if s.package != BUILTIN_PACKAGE] if builtin else specs
            names = ", ".join(f"package {s.package!r} (plugin {s.plugin!r})" for s in specs)
            for s in others:
                broken.setdefault(s.plugin, f"registers {key[0]} {key[1]!r}, which is registered by {names}; "
                                            f"{'the built-in keeps the name' if builtin else 'neither gets it'}: rename "
                                            f"it in the plugin or uninstall one")
        for plugin_name, reason in broken.items():
            self._collect_failures.append(PluginFailure(plugin_name, self._packages.get(plugin_name, ("?",))[0], reason))
        withheld: dict[tuple[str, str], str] = {}
        out: dict[tuple[str, str], PluginSpec] = {}
        for plugin_name, specs in per_plugin.items():
            for spec in specs:
                if plugin_name in broken:
                    withheld.setdefault((spec.kind, spec.name), f"{spec.kind} {spec.name!r} comes from a broken plugin: "
                                        f"plugin {plugin_name!r} (package {spec.package!r}) {broken[plugin_name]}")
                else:
                    out.setdefault((spec.kind, spec.name), spec)
        for shadow_name, (plugin, package, reason) in self._shadow.items():
            impls = {n: getattr(plugin, n) for n in _HOOK_OF_KIND.values() if callable(getattr(plugin, n, None))}
            got = self._registrations(shadow_name.split("@")[0], package, "", impls)
            for spec in got if isinstance(got, list) else []:
                key = (spec.kind, spec.name)
                if key not in out:
                    withheld.setdefault(key, f"{spec.kind} {spec.name!r} comes from a broken plugin: plugin "
                                        f"{spec.plugin!r} (package {package!r}): {reason}")
        self._withheld = {k: v for k, v in withheld.items() if k not in out}
        return out

    @property
    def specs(self) -> dict[tuple[str, str], PluginSpec]:
        if self._specs is None:
            self._specs = self._collect()
        return self._specs

    def names(self, kind: str) -> list[str]:
        return sorted(n for (k, n) in self.specs if k == kind)

    def withheld(self, kind: str, name: str) -> str | None:
        """Why a broken plugin's component `name` is not available (None: not a broken plugin's)."""
        self.specs  # noqa: B018 - collection fills the withheld table
        return self._withheld.get((kind, name))

    def not_found(self, kind: str, name: str) -> str:
        """The message for an unknown component: the broken plugin's reason, or the nearest name and what failed."""
        why = self.withheld(kind, name)
        if why is not None:
            return why
        sugg = nearest(name, self.names(kind))
        hint = f"; did you mean {sugg!r}?" if sugg else f"; registered: {', '.join(self.names(kind)) or 'none'}"
        unknown = [f for f in self._load_failures if f.plugin not in self._shadow and not any(
            key.startswith(f"{f.plugin}@") for key in self._shadow)]
        if unknown:
            hint += "; plugins that failed to load (it may be one of theirs): " + "; ".join(
                f"{f.plugin!r} (package {f.package!r}): {f.error}" for f in unknown[:3])
        return f"no {kind} named {name!r}{hint}"

    def get(self, kind: str, name: str) -> PluginSpec:
        if kind not in KINDS:
            raise RegistryError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
        try:
            return self.specs[(kind, name)]
        except KeyError:
            raise RegistryError(self.not_found(kind, name)) from None

    def all(self) -> list[PluginSpec]:
        return sorted(self.specs.values(), key=lambda s: (KINDS.index(s.kind), s.name))

    def add_commands(self, app: Any) -> None:
        broken = {f.plugin for f in self.failures}
        for impl in self.pm.hook.register_commands.get_hookimpls():
            if impl.plugin_name in broken:
                continue
            n_cmds, n_groups = len(app.registered_commands), len(app.registered_groups)
            try:
                impl.function(app=app)
                import typer.main

                typer.main.get_command(app)  # a command Typer cannot build would break every command later
            except (Exception, SystemExit) as exc:  # noqa: BLE001
                del app.registered_commands[n_cmds:]
                del app.registered_groups[n_groups:]
                self._fail(impl.plugin_name, self._packages.get(impl.plugin_name, ("?",))[0],
                           f"register_commands: {type(exc).__name__}: {exc}")


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
