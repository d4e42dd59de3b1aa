"""`tensorboard`: torch.utils.tensorboard's SummaryWriter in RUN/<log_dir>. Scalars under their metric names, sample
grids as images, the resolved recipe as text. On resume, events after the checkpoint's step are purged (the
writer's purge_step), so curves do not double back."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.api import BuildContext, Logger


class TensorBoardLogger(Logger):
    def __init__(self, ctx: BuildContext, *, log_dir: str, flush_secs: int, images: bool):
        super().__init__(ctx)
        self.log_dir, self.flush_secs, self.images = log_dir, flush_secs, images
        self.writer = None

    def start(self, run_dir: Path, recipe: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        import tomli_w

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / self.log_dir), flush_secs=self.flush_secs,
                                    purge_step=None if resume_step is None else resume_step + 1)
        self.writer.add_text("recipe", "```toml\n" + tomli_w.dumps(recipe) + "\n```", global_step=resume_step or 0)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, global_step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        if not self.images:
            return
        import numpy as np
        from PIL import Image

        for name, path in images.items():
            arr = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(name, arr, global_step=step, dataformats="HWC")

    def finish(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"summary/{k}", v, global_step=int(summary.get("step", 0)))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
