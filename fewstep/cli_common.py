"""What every fewstep command module shares: the consoles, argument types, and the error guard.

Standard library, typer and rich only (the CLI must start fast). ``fewstep.cli`` builds the app and
registers the command modules onto it (``fewstep.cli_eval.register(app)``); nothing here imports them.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import errors
from .recipe import load_recipe

console = Console()
err = Console(stderr=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="TABLE.KEY=VALUE",
                                                     help="override a recipe value (repeatable), e.g. --set train.steps=500",
                                                     rich_help_panel="Overrides")]
RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe TOML file", exists=True, dir_okay=False)]


def _fail(message: str, code: int = 2) -> None:
    err.print("[bold red]error:[/bold red] ", end="", highlight=False)
    err.print(message, highlight=False, soft_wrap=True, markup=False)  # messages quote [tables]: no markup
    raise typer.Exit(code)


def guarded(fn):
    """Every command's errors in one line: named errors exit 2 (the user's to fix) or 1 (a runtime fault), no
    traceback unless FEWSTEP_DEBUG=1; Ctrl-C exits 130 with a note on how to resume."""
    if getattr(fn, "__fewstep_guarded__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]", highlight=False)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one place exceptions become exit codes
            if getattr(exc, "exit_code", None) is not None and type(exc).__module__.startswith(("click", "typer")):
                raise
            if errors.debug():
                err.print_exception(show_locals=False)
            _fail(errors.describe(exc), errors.exit_code_of(exc))

    wrapper.__fewstep_guarded__ = True
    return wrapper


def guard_commands(typer_app) -> None:
    """Wrap every registered command (built-in or a plugin's, sub-apps included) with :func:`guarded`."""
    for cmd in typer_app.registered_commands:
        if cmd.callback is not None:
            cmd.callback = guarded(cmd.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            guard_commands(group.typer_instance)


def _load(recipe: Path, overrides: list[str] | None):
    return load_recipe(recipe, overrides or [])


