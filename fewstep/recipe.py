"""TOML recipes: load, inherit (`extends`), override (`--set table.key=value`), validate.

A recipe is one TOML file with the tables ``[data] [backbone] [objective]
[sampler] [train] [eval]``. Component tables choose a plugin with ``name``; their
other keys are validated against that plugin's declared options. ``[train]`` and
``[eval]`` are validated against the engine's options below. Every error names
the file the key came from, the key, and the nearest valid spelling, and is
raised before any work starts.
"""
from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The one place that chooses the TOML reader: the standard library's tomllib on Python 3.11+,
# the tomli backport (a dependency on 3.10) before. Every other module reads TOML through
# `toml_value` below or `from fewstep.recipe import tomllib`.
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by tests/test_api.py with a stand-in module
    import tomli as tomllib

from .errors import UserError
from .options import Option, OptionError, OptionSet, nearest


def parse_toml(text: str | bytes) -> dict[str, Any]:
    """TOML text -> dict, with tomllib (tomli on Python 3.10): the one place fewstep parses TOML."""
    return tomllib.loads(text.decode("utf-8") if isinstance(text, bytes) else text)

COMPONENT_TABLES = ("data", "backbone", "objective", "sampler")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
TABLES = COMPONENT_TABLES + ("train", "eval", "loggers")
TOP_LEVEL_KEYS = ("name", "description", "extends")
_KIND_OF_TABLE = {"data": "dataset", "backbone": "backbone", "objective": "objective", "sampler": "sampler"}

TRAIN_OPTIONS = OptionSet([
    Option("steps", int, 1000, "optimizer steps", ge=1),
    Option("batch", int, 128, "global batch size: split over the ranks, and on each rank over train.accum micro-batches "
           "(must be divisible by ranks x accum)", ge=1),
    Option("accum", int, 1, "gradient accumulation: micro-batches per optimizer step on each rank (fewer GPUs, same "
           "global batch: 8 GPUs x accum 1 = 4 GPUs x accum 2)", ge=1),
    Option("lr", float, 1e-4, "learning rate", gt=0),
    Option("optimizer", str, "adamw", "optimizer", choices=("adamw", "adam", "radam")),
    Option("betas", float, [0.9, 0.999], "Adam betas (beta1, beta2)", is_list=True, ge=0, lt=1),
    Option("weight_decay", float, 0.0, "decoupled (adamw) or L2 (adam/radam) weight decay", ge=0),
    Option("adam_eps", float, 1e-8, "Adam epsilon", gt=0),
    Option("warmup_steps", int, 0, "linear learning-rate warm-up steps (0: constant lr)", ge=0),
    Option("ema", float, [0.9999], "EMA decays (one EMA copy per decay, after any ema_halflife_kimg copies; copy 0 is used for sampling)", is_list=True, ge=0, lt=1),
    Option("ema_halflife_kimg", float, [], "EDM half-life EMA copies, half-life in thousands of images (the sCT "
           "paper's CIFAR-10 EMA: 500); they come first (copy 0 is sampled), before the constant `ema` decays",
           is_list=True, gt=0),
    Option("ema_rampup", float, 0.05, "EDM's EMA ramp-up ratio for the half-life copies: the half-life is at most "
           "this share of the images seen so far (0: off)", ge=0),
    Option("ema_every", int, 1, "update the EMA every N steps with decay**N (CIFAR recipes use 16)", ge=1),
    Option("ema_offset", int, 0, "with ema_every = N > 1, the EMA updates after the finished steps k with k % N == "
           "ema_offset: 0 gives steps N, 2N, ... (py-meanflow), 1 gives steps 1, N + 1, ... (SoFlow's CIFAR code)", ge=0),
    Option("grad_clip", float, 0.0, "clip the global grad norm to this value (0: off, the official default)", ge=0),
    Option("precision", str, "fp32", "fp32, tf32 (TF32 matmuls on CUDA) or bf16 (bf16 autocast)", choices=("fp32", "tf32", "bf16")),
    Option("device", str, "auto", "auto (CUDA when present, else CPU), cpu or cuda", choices=("auto", "cpu", "cuda")),
    Option("seed", int, 0, "global seed; rank r uses seed * world + r", ge=0, le=2**32 - 1),
    Option("log_every", int, 50, "steps between metrics.jsonl lines", ge=1),
    Option("checkpoint_every", int, 0, "steps between checkpoints (0: only at the end)", ge=0),
    Option("keep_checkpoints", int, 2, "how many checkpoints to keep", ge=1),
    Option("max_bad_steps", int, 5, "consecutive non-finite steps that stop the run", ge=1),
    Option("max_seconds", float, 0.0, "wall-clock training budget in seconds (0: none); stops early at a step boundary", ge=0),
    Option("compile", bool, False, "torch.compile the backbone"),
    Option("compile_mode", str, "default", "torch.compile mode when compile is on: default, reduce-overhead (CUDA "
           "graphs: fewer launch gaps for small models), max-autotune, max-autotune-no-cudagraphs",
           choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
    Option("loggers", str, ["jsonl"], "experiment loggers (plugins), each configured in its own [loggers.<name>] table; "
           "jsonl writes metrics.jsonl (fewstep plot, compare and resume read it)", is_list=True),
])

EVAL_OPTIONS = OptionSet([
    Option("every", int, 0, "steps between sample grids (0: only at the end)", ge=0),
    Option("nfe", int, [1, 2], "network evaluations per sample for grids and metrics", is_list=True, ge=1),
    Option("grid", int, 64, "images per sample grid", ge=1),
    Option("seed", int, 0, "seed of the fixed noise and labels used for grids and metrics", ge=0, le=2**32 - 1),
    Option("metrics", str, [], "evaluator names run by `fewstep eval` and `compare`", is_list=True),
    Option("after_train", str, [], "evaluator names `fewstep train` runs on the final EMA weights at every NFE "
           "(num_samples each); printed and written to RUN/eval_after_train.json", is_list=True),
    Option("num_samples", int, 10000, "samples per metric evaluation", ge=1),
    Option("batch", int, 256, "sampling batch size", ge=1),
    Option("precision", str, "fp32", "arithmetic of the network while sampling for metrics (eval, compare, "
           "after_train): fp32 (EDM's and ECT's evaluations), tf32 (TF32 matmuls and convolutions on CUDA: SoFlow's and "
           "py-meanflow's) or bf16 "
           "(autocast); the feature extractor always runs as torch-fidelity builds it", choices=("fp32", "tf32", "bf16")),
])


class RecipeError(UserError, ValueError):
    """A recipe problem: file, dotted key, message and the nearest valid spelling."""

    def __init__(self, file: str, key: str, message: str, suggestion: str | None = None):
        self.file, self.key, self.message, self.suggestion = file, key, message, suggestion
        text = f"{file}: {key}: {message}"
        if suggestion:
            text += f"; did you mean {suggestion!r}?"
        super().__init__(text)


@dataclass
class Component:
    name: str
    options: dict[str, Any]


@dataclass
class Recipe:
    """A fully resolved, validated recipe: every option present, no `extends`."""

    name: str
    source: str
    data: Component
    backbone: Component
    objective: Component
    sampler: Component
    train: dict[str, Any]
    eval: dict[str, Any]
    description: str = ""
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)  # train.loggers, in order -> resolved options

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        for table in COMPONENT_TABLES:
            comp: Component = getattr(self, table)
            out[table] = {"name": comp.name, **_drop_none(comp.options)}
        out["train"] = _drop_none(self.train)
        out["eval"] = _drop_none(self.eval)
        if self.loggers:
            out["loggers"] = {name: _drop_none(opts) for name, opts in self.loggers.items()}
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def component(self, table: str) -> Component:
        return getattr(self, table)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# -- loading ---------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, str, Any]:
    """``table.key=value`` -> (table, key, value); the value is read with TOML's grammar."""
    if "=" not in text:
        raise RecipeError("--set", text, "an override must look like table.key=value")
    path, _, raw = text.partition("=")
    path = path.strip()
    if "." not in path and path not in TOP_LEVEL_KEYS:
        raise RecipeError("--set", path, f"an override key must be table.key or one of {', '.join(TOP_LEVEL_KEYS)}",
                          nearest(path, TABLES + TOP_LEVEL_KEYS))
    table, _, key = path.partition(".")
    return table, key, toml_value(raw.strip())


def toml_value(raw: str, kinds: tuple[type, ...] = (bool, int, float, str, list)) -> Any:
    """One value written in TOML's grammar (``3`` -> int, ``true`` -> bool, ``[1, 2]`` -> list); text
    that is not valid TOML, or parses to a type outside `kinds` (dates, tables), stays the string."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    return value if isinstance(value, kinds) else raw


def _read(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """Read a recipe and its `extends` chain; return merged data and the origin file of each key."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise RecipeError(str(path), "extends", f"circular inheritance: {chain}")
    if not path.is_file():
        where = str(seen[-1]) if seen else str(path)
        raise RecipeError(where, "extends" if seen else "(file)", f"recipe file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(str(path), "(syntax)", f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise RecipeError(str(path), "(file)", "is not a text file (a recipe is UTF-8 TOML)") from None
    except OSError as exc:
        raise RecipeError(str(path), "(file)", f"cannot be read: {exc.strerror or exc}") from None
    parent = raw.pop("extends", None)
    data: dict[str, Any] = {}
    origin: dict[tuple[str, str], str] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(str(path), "extends", "must be a path string")
        data, origin = _read((path.parent / parent), seen + (path,))
    for top, value in raw.items():
        if isinstance(value, dict):
            table = data.setdefault(top, {})
            if not isinstance(table, dict):
                raise RecipeError(str(path), top, "is a table here but a value in the parent recipe")
            # a different plugin in the child resets the parent's plugin-specific keys
            if "name" in value and table.get("name") not in (None, value["name"]):
                table.clear()
                for k in [k for k in origin if k[0] == top]:
                    del origin[k]
            for k, v in value.items():
                table[k] = copy.deepcopy(v)
                origin[(top, k)] = str(path)
        else:
            data[top] = value
            origin[(top, "")] = str(path)
    return data, origin


def load_recipe(path: str | Path, overrides: list[str] | None = None, registry: Any = None) -> Recipe:
    """Load, merge, override and validate a recipe. Raises RecipeError on the first problem."""
    path = Path(path)
    data, origin = _read(path, ())
    for text in overrides or []:
        table, key, value = parse_override(text)
        if table in TOP_LEVEL_KEYS and not key:
            if table == "extends":
                raise RecipeError("--set", "extends", "cannot be overridden; write a recipe that extends the other")
            data[table] = value
            origin[(table, "")] = "--set"
            continue
        if table not in TABLES:
            raise RecipeError("--set", f"{table}.{key}", f"unknown table {table!r}", nearest(table, TABLES))
        tbl = data.setdefault(table, {})
        if table == "loggers":  # --set loggers.<name>.<key>=value
            logger, _, opt = key.partition(".")
            if not opt:
                raise RecipeError("--set", f"loggers.{key}", "a logger option is set as loggers.<name>.<key>=value")
            tbl.setdefault(logger, {})[opt] = value
            origin[("loggers", logger)] = "--set"
            continue
        if key == "name" and tbl.get("name") not in (None, value):
            tbl.clear()  # switching plugin drops the previous plugin's keys
        tbl[key] = value
        origin[(table, key)] = "--set"
    return validate(data, origin, str(path), registry)


def validate(data: dict[str, Any], origin: dict[tuple[str, str], str], source: str, registry: Any = None) -> Recipe:
    if registry is None:
        from .registry import get_registry

        registry = get_registry()

    def where(table: str, key: str = "") -> str:
        return origin.get((table, key)) or origin.get((table, "name")) or source

    for top, value in data.items():
        if isinstance(value, dict):
            if top not in TABLES:
                first = next(iter(value), "")
                key = f"{top}.{first}" if first else top
                raise RecipeError(where(top, first), key, f"unknown table {top!r} (tables: {', '.join(TABLES)})", nearest(top, TABLES))
        elif top not in TOP_LEVEL_KEYS:
            raise RecipeError(where(top), top, f"unknown top-level key {top!r}", nearest(top, TOP_LEVEL_KEYS + TABLES))

    name = data.get("name") or (re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).stem).strip("_.") or "run")
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise RecipeError(where("name"), "name", f"{name!r} cannot name a run folder: use letters, digits, '.', '_' "
                          f"and '-' only (no path separators; choose the folder itself with --out)")
    components: dict[str, Component] = {}
    for table in COMPONENT_TABLES:
        tbl = dict(data.get(table, {}))
        plugin = tbl.pop("name", None)
        if plugin is None and table == "sampler":
            objective = components["objective"].name
            plugin = registry.get("objective", objective).extras.get("default_sampler")
            if plugin is None:
                raise RecipeError(source, "sampler.name", f"objective {objective!r} names no default sampler; set [sampler] name")
        if plugin is None:
            raise RecipeError(source, f"{table}.name", f"missing [{table}] table or its 'name' key")
        if not isinstance(plugin, str):
            raise RecipeError(where(table, "name"), f"{table}.name", f"must be a string, got {plugin!r}")
        kind = _KIND_OF_TABLE[table]
        names = registry.names(kind)
        if plugin not in names:
            why = registry.withheld(kind, plugin)
            if why is not None:
                raise RecipeError(where(table, "name"), f"{table}.name", why)
            raise RecipeError(where(table, "name"), f"{table}.name", registry.not_found(kind, plugin).replace(
                f"no {kind} named", f"no {kind} plugin named", 1).split("; did you mean")[0], nearest(plugin, names))
        spec = registry.get(kind, plugin)
        try:
            opts = spec.options.resolve(tbl)
        except OptionError as exc:
            raise RecipeError(where(table, exc.key), f"{table}.{exc.key}", f"{exc.message} ({kind} {plugin!r})", exc.suggestion) from None
        components[table] = Component(plugin, opts)

    resolved: dict[str, dict[str, Any]] = {}
    for table, optset in (("train", TRAIN_OPTIONS), ("eval", EVAL_OPTIONS)):
        try:
            resolved[table] = optset.resolve(dict(data.get(table, {})))
        except OptionError as exc:
            raise RecipeError(where(table, exc.key), f"{table}.{exc.key}", exc.message, exc.suggestion) from None
    if resolved["train"]["batch"] % resolved["train"]["accum"]:
        b, a = resolved["train"]["batch"], resolved["train"]["accum"]
        raise RecipeError(where("train", "accum"), "train.accum", f"train.batch = {b} cannot be cut into {a} equal "
                          f"micro-batches; choose a batch divisible by {a} (and by the number of GPUs times {a})")
    if not resolved["train"]["ema"] and not resolved["train"]["ema_halflife_kimg"]:
        raise RecipeError(where("train", "ema"), "train.ema", "no EMA copy: give at least one decay in train.ema (or "
                          "a half-life in train.ema_halflife_kimg); sampling and evaluation read copy 0")
    if resolved["train"]["ema_offset"] >= resolved["train"]["ema_every"]:
        o, n = resolved["train"]["ema_offset"], resolved["train"]["ema_every"]
        raise RecipeError(where("train", "ema_offset"), "train.ema_offset", f"= {o} must be below train.ema_every = {n} "
                          f"(the EMA updates after the steps k with k % {n} == ema_offset)")
    if len(resolved["train"]["betas"]) != 2:
        raise RecipeError(where("train", "betas"), "train.betas", f"needs exactly two values, got {resolved['train']['betas']}")
    loggers: dict[str, dict[str, Any]] = {}
    tables = data.get("loggers", {})
    if not isinstance(tables, dict):
        raise RecipeError(where("loggers"), "loggers", "must be a table of [loggers.<name>] tables")
    for lname in resolved["train"]["loggers"]:
        if lname in loggers:
            raise RecipeError(where("train", "loggers"), "train.loggers", f"names logger {lname!r} twice")
        if lname not in registry.names("logger"):
            why = registry.withheld("logger", lname)
            raise RecipeError(where("train", "loggers"), "train.loggers", why or registry.not_found("logger", lname).split(
                "; did you mean")[0], None if why else nearest(lname, registry.names("logger")))
        opts = tables.get(lname, {})
        if not isinstance(opts, dict):
            raise RecipeError(where("loggers", lname), f"loggers.{lname}", "must be a table of that logger's options")
        try:
            loggers[lname] = registry.get("logger", lname).options.resolve(dict(opts))
        except OptionError as exc:
            raise RecipeError(where("loggers", lname), f"loggers.{lname}.{exc.key}", f"{exc.message} (logger {lname!r})",
                              exc.suggestion) from None
    for lname in tables:
        if lname not in loggers:
            raise RecipeError(where("loggers", lname), f"loggers.{lname}", f"configures logger {lname!r}, which "
                              f"train.loggers does not list ({resolved['train']['loggers']}); add it there or drop the table",
                              nearest(lname, resolved["train"]["loggers"]))
    for key in ("metrics", "after_train"):
        unknown_metrics = [m for m in resolved["eval"][key] if m not in registry.names("evaluator")]
        if unknown_metrics:
            m = unknown_metrics[0]
            why = registry.withheld("evaluator", m)
            raise RecipeError(where("eval", key), f"eval.{key}", why or registry.not_found("evaluator", m).split(
                "; did you mean")[0], None if why else nearest(m, registry.names("evaluator")))
    return Recipe(name=str(name), source=source, description=str(data.get("description", "")), **components,
                  train=resolved["train"], eval=resolved["eval"], loggers=loggers)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>", registry: Any = None) -> Recipe:
    """Validate a recipe given as a dict (a run folder's recipe.toml, tests)."""
    origin = {(t, k): source for t, v in data.items() if isinstance(v, dict) for k in v}
    return validate(copy.deepcopy(data), origin, source, registry)
