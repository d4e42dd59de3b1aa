"""fewstep's named errors and the one place the command line turns an exception into an exit code.

Every mistake a user can make (a recipe value, a file, a folder, a plugin) raises a :class:`UserError`:
one line that names the file, key or component and what to do; the CLI prints it and exits with 2, no
traceback. A fault while running (training diverged, a failure inside a plugin's numerics) is a
:class:`RuntimeFault` and exits with 1. Anything else is reported as an internal error, also in one line,
exit 1. ``FEWSTEP_DEBUG=1`` adds the traceback to any of them.

Standard library only: the CLI imports this module.
"""
from __future__ import annotations

import os


class FewstepError(Exception):
    """Base of fewstep's named errors; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UserError(FewstepError):
    """A mistake the user can fix (recipe, file, folder, plugin choice): exit code 2."""

    exit_code = 2


class RuntimeFault(FewstepError):
    """A fault while running (e.g. training diverged): exit code 1."""

    exit_code = 1


class BuildError(UserError):
    """A component could not be built from the recipe's values (the plugin said why)."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: truncated, from another model, not a fewstep checkpoint."""


class DataError(UserError, ValueError):
    """Data a user pointed at cannot be used as asked (missing or unreadable files, a cache made for other
    settings). The message is one line naming the file or option and what to do; the CLI prints it and exits 2."""


class RunFolderError(UserError):
    """The run folder cannot be used as asked (not a run, already a run, locked, unwritable)."""


class Preempted(FewstepError):
    """SIGTERM / SIGUSR1 asked the run to stop; a checkpoint was written at the step boundary."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:  # the shell's convention for "stopped by signal N"
        return 128 + self.signal_number


def debug() -> bool:
    """FEWSTEP_DEBUG=1: show tracebacks."""
    return os.environ.get("FEWSTEP_DEBUG", "") not in ("", "0", "false", "no")


def exit_code_of(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, FewstepError) else 1


def describe(exc: BaseException) -> str:
    """The one line a user sees for `exc`."""
    if isinstance(exc, FewstepError):
        return str(exc)
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc} (choose a folder you can write, e.g. with --out)"
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and exc.filename:
        return f"{exc.strerror or 'not found'}: {exc.filename}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return (f"internal error: {type(exc).__name__}: {exc} (this is a bug in fewstep or a plugin; "
            f"FEWSTEP_DEBUG=1 shows the traceback)")


def user_error_codes(exc: BaseException) -> int:
    """Exit code, with operating-system errors on user-named paths counted as user errors."""
    if isinstance(exc, FewstepError):
        return exc.exit_code
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return 2
    return 1
