"""`wandb`: a Weights & Biases run with the resolved recipe as its config. Needs the optional extra
(`pip install 'fewstep[wandb]'`); asked for without it, the run stops before any work with a named error.

The run id is kept in RUN/wandb_run_id, so `--resume` continues the same W&B run (resume="allow").
"""
from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import Any

from fewstep.api import BuildContext, Logger, UserError


def _new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits, the form wandb makes its own)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLogger(Logger):
    def __init__(self, ctx: BuildContext, *, project: str, entity: str, mode: str, group: str, tags: list[str],
                 images: bool):
        super().__init__(ctx)
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("logger 'wandb' needs the wandb package: pip install 'fewstep[wandb]' (or drop \"wandb\" "
                            "from train.loggers)") from None
        self.project, self.entity, self.mode, self.group, self.tags, self.images = project, entity, mode, group, tags, images
        self.run = None

    def start(self, run_dir: Path, recipe: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if (resume_step is not None and id_file.is_file()) else _new_run_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=self.project, entity=self.entity or None, mode=os.environ.get("WANDB_MODE", self.mode),
                              group=self.group or None, tags=self.tags or None, name=recipe.get("name"), id=run_id,
                              resume="allow", dir=str(run_dir), config=recipe)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        if self.images:
            import wandb

            self.run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = v

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
