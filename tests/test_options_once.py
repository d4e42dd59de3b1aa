"""Options are declared once: a plugin's Option list (in its torch-free registration module) is the only
place a default lives. Every built-in factory takes the context plus exactly its declared options, as
keyword-only parameters without defaults, so a default written a second time cannot exist, and an option
that is declared but never reaches the factory (or the reverse) is caught here."""
import ast
import inspect
from pathlib import Path

import pytest

from fewstep.interfaces import BuildContext, Objective
from fewstep.registry import BUILTIN_PACKAGE, Registry

ROOT = Path(__file__).resolve().parent.parent
REG = Registry()
BUILTINS = [s for s in REG.all() if s.package == BUILTIN_PACKAGE]


def factory_signature(factory) -> inspect.Signature:
    """What `factory(ctx, **options)` binds to: a class's __init__ (without self) or the function itself."""
    return inspect.signature(factory)


def signature_problems(factory, declared: set[str]) -> list[str]:
    params = list(factory_signature(factory).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = {p.name: p for p in params if p.kind is p.KEYWORD_ONLY}
    out = []
    if len(positional) != 1 or positional[0].default is not positional[0].empty:
        out.append(f"takes {[p.name for p in positional]} positionally; the convention is factory(ctx, *, <options>)")
    out += [f"takes *{p.name}/**{p.name}" for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing := sorted(declared - set(keyword)):
        out.append(f"declared options missing from the signature: {missing}")
    if extra := sorted(set(keyword) - declared):
        out.append(f"keyword parameters that are no declared option: {extra}")
    out += [f"{n} has a default ({p.default!r}) besides its declaration" for n, p in keyword.items()
            if p.default is not p.empty]
    return out


def test_there_are_builtins_of_every_kind():
    kinds = {s.kind for s in BUILTINS}
    assert {"backbone", "objective", "sampler", "dataset", "evaluator", "logger"} <= kinds
    assert len(BUILTINS) >= 20


@pytest.mark.parametrize("spec", BUILTINS, ids=lambda s: f"{s.kind}:{s.name}")
def test_factory_takes_exactly_its_declared_options_without_defaults(spec):
    problems = signature_problems(spec.load(), set(spec.options.names))
    assert not problems, f"{spec.kind} {spec.name!r} ({spec.factory}):\n  " + "\n  ".join(problems)


def test_the_check_catches_a_second_default_a_missing_and_an_extra_option():
    def good(ctx, *, a, b):
        pass

    def doubled(ctx, *, a, b=2):
        pass

    def loose(ctx, a=1, **kw):
        pass

    assert signature_problems(good, {"a", "b"}) == []
    assert signature_problems(doubled, {"a", "b"}) == ["b has a default (2) besides its declaration"]
    assert signature_problems(good, {"a", "b", "c"}) == ["declared options missing from the signature: ['c']"]
    assert signature_problems(good, {"a"}) == ["keyword parameters that are no declared option: ['b']"]
    loose_problems = signature_problems(loose, {"a"})
    assert any("positionally" in p for p in loose_problems) and any("**kw" in p for p in loose_problems)


def test_create_fills_in_the_declared_defaults_and_nothing_else():
    """PluginSpec.create is the notebook/test door: declared defaults + validated overrides, one source."""
    spec = REG.get("evaluator", "gmm-exact")
    ev = spec.create(BuildContext(), num_points=64)
    declared = spec.options.resolve({})
    assert ev.num_points == 64 and ev.ode_steps == declared["ode_steps"] and ev.seed == declared["seed"]
    assert ev.times == sorted(set(declared["times"]) | {0.0, 1.0}, reverse=True)
    with pytest.raises(TypeError):
        spec.load()(BuildContext())  # no second set of defaults to fall back on


# -- default_sampler: named once, at registration ------------------------------------------------

def test_every_builtin_objective_names_its_default_sampler_once_at_registration():
    samplers = set(REG.names("sampler"))
    for spec in (s for s in BUILTINS if s.kind == "objective"):
        assert spec.extras.get("default_sampler") in samplers, spec.name
        cls = spec.load()
        assert isinstance(cls, type) and issubclass(cls, Objective)
        assert not any("default_sampler" in vars(k) for k in cls.__mro__), f"{cls} declares default_sampler again"


def test_no_source_assigns_default_sampler_outside_a_register_call():
    """`default_sampler` appears in code only as the keyword of register(...) (and where the registry reads it)."""
    bad = []
    for path in [*(ROOT / "fewstep").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
                if name == "default_sampler":
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
    text = (ROOT / "fewstep" / "interfaces.py").read_text(encoding="utf-8")
    assert 'register(..., default_sampler="...")' in text  # the contract says where it is named
