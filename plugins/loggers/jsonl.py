"""`jsonl`: one JSON line per logged step. On resume the lines logged after the checkpoint are dropped (they are
logged again), atomically, so every step appears once."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fewstep.api import BuildContext, Logger


class JsonlLogger(Logger):
    def __init__(self, ctx: BuildContext, *, file: str):
        super().__init__(ctx)
        if Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(f"jsonl: file must be a file name inside the run folder, got {file!r}")
        self.file = file
        self.path: Path | None = None

    def start(self, run_dir: Path, recipe: dict[str, Any], resume_step: int | None) -> None:
        self.path = Path(run_dir) / self.file
        if resume_step is not None and self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            tmp = self.path.with_name(f".{self.file}.tmp-{os.getpid()}")
            tmp.write_text("".join(x + "\n" for x in keep))
            os.replace(tmp, self.path)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **scalars}) + "\n")
