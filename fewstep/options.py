"""Declared, validated plugin options (standard library only: `fewstep check` stays fast).

A plugin declares its options as a list of :class:`Option`; a recipe table is
validated against that list before any work starts. Validation coerces ints to
floats where a float is declared (``lr = 3`` is fine), checks ranges and
choices, and fills defaults.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .errors import UserError

_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str"}


class OptionError(UserError, ValueError):
    """A value that does not fit its declared option. `key` is the offending key."""

    def __init__(self, key: str, message: str, suggestion: str | None = None):
        super().__init__(message)
        self.key = key
        self.message = message
        self.suggestion = suggestion


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest valid spelling of `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


@dataclass(frozen=True)
class Option:
    """One declared option of a plugin.

    type: int, float, bool or str; `is_list=True` makes it a list of that type.
    ge/le/gt/lt: inclusive/exclusive bounds (applied to every list element).
    choices: allowed values. required: no default, the recipe must set it.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: Sequence[Any] | None = None
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None
    is_list: bool = False
    required: bool = False
    nullable: bool = False

    def __post_init__(self):
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"option {self.name!r}: unsupported type {self.type!r}")
        if not self.required and self.default is not None:
            # Declarations are checked too: a wrong default is a plugin bug.
            self.validate(self.default)

    @property
    def type_name(self) -> str:
        base = _TYPE_NAMES[self.type]
        return f"list[{base}]" if self.is_list else base

    def describe(self) -> str:
        parts = [self.type_name]
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(repr, self.choices)))
        for sym, bound in (("≥", self.ge), ("≤", self.le), (">", self.gt), ("<", self.lt)):
            if bound is not None:
                parts.append(f"{sym} {bound}")
        return "; ".join(parts)

    def _scalar(self, value: Any, where: str) -> Any:
        t = self.type
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if t is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        if not isinstance(value, t) or (t is not bool and isinstance(value, bool)):
            raise OptionError(
                self.name,
                f"{where} must be {_TYPE_NAMES[t]}, got {type(value).__name__} {value!r}",
            )
        if t is float and not math.isfinite(value):
            raise OptionError(self.name, f"{where} = {value!r} is not a finite number")
        if self.choices is not None and value not in self.choices:
            sugg = nearest(str(value), [str(c) for c in self.choices]) if t is str else None
            raise OptionError(
                self.name,
                f"{where} = {value!r} is not one of {list(self.choices)}",
                sugg,
            )
        if t in (int, float):
            checks = (
                (self.ge, lambda b: value >= b, "≥"),
                (self.le, lambda b: value <= b, "≤"),
                (self.gt, lambda b: value > b, ">"),
                (self.lt, lambda b: value < b, "<"),
            )
            for bound, ok, sym in checks:
                if bound is not None and not ok(bound):
                    raise OptionError(self.name, f"{where} = {value!r} is out of range (must be {sym} {bound})")
        return value

    def validate(self, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        if self.is_list:
            if not isinstance(value, list):
                value = [value]  # a scalar where a list is declared means a one-element list
            return [self._scalar(v, f"{self.name}[{i}]") for i, v in enumerate(value)]
        return self._scalar(value, self.name)


@dataclass
class OptionSet:
    """The options of one plugin, looked up by name."""

    options: list[Option] = field(default_factory=list)

    def __post_init__(self):
        names = [o.name for o in self.options]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"options declared twice: {sorted(dup)}")
        if "name" in names:
            raise ValueError("'name' is reserved: it chooses the plugin")

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.options]

    def resolve(self, values: dict[str, Any]) -> dict[str, Any]:
        """Validate `values` (without `name`) and fill defaults; raise OptionError on the first problem."""
        by_name = {o.name: o for o in self.options}
        for key in values:
            if key not in by_name:
                raise OptionError(key, f"unknown key {key!r}", nearest(key, by_name))
        out: dict[str, Any] = {}
        for opt in self.options:
            if opt.name in values:
                out[opt.name] = opt.validate(values[opt.name])
            elif opt.required:
                raise OptionError(opt.name, f"missing required key {opt.name!r} ({opt.describe()})")
            else:
                out[opt.name] = list(opt.default) if isinstance(opt.default, list) else opt.default
        return out
