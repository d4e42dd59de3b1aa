"""One live process per run folder: an advisory lock on ``RUN/.lock`` held for the whole run.

The lock is an ``fcntl.flock`` on the file, so the operating system drops it the moment its process ends,
``kill -9`` included: a stale lock of a killed run is taken over without any clean-up. The file records
the holder's pid, host and start time, so that a second ``fewstep train`` into the same folder gets an
error that names the process using it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import RunFolderError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: no locking (documented in docs/reliability.md)
    fcntl = None

LOCK_NAME = ".lock"


class RunLock:
    """Acquire with :meth:`acquire`; release with :meth:`release` (or let the process end)."""

    def __init__(self, run_dir: Path, fh):
        self.run_dir = run_dir
        self._fh = fh

    @classmethod
    def acquire(cls, run_dir: Path, what: str = "fewstep train") -> "RunLock":
        run_dir = Path(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fh = open(run_dir / LOCK_NAME, "a+")
        except OSError as exc:
            raise RunFolderError(f"cannot use run folder {run_dir}: {exc.strerror or exc} (choose a folder you can "
                                 f"write with --out)") from None
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = _describe(fh.read())
                fh.close()
                raise RunFolderError(f"run folder {run_dir} is in use by {holder}; wait for it to finish, stop it, "
                                     f"or choose another folder with --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                             "command": what}) + "\n")
        fh.flush()
        return cls(run_dir, fh)

    @staticmethod
    def name_in(run_dir: Path) -> str:
        return LOCK_NAME

    def release(self) -> None:
        if self._fh is not None:
            if fcntl is not None:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        d = json.loads(text.strip().splitlines()[-1])
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(d["started"])))
        return f"another {d.get('command', 'fewstep')} (pid {d['pid']} on {d['host']}, started {when})"
    except (ValueError, KeyError, IndexError, TypeError):
        return "another fewstep process"
