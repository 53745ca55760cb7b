"""TensorBoard event files in the run folder (or a shared log_dir, one subfolder per run)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from segplat.engine.loggers.base import (
    RunInfo,
    Tracker,
    numeric,
    require,
)
from segplat.errors import CheckpointError
from segplat.utils.io import dumps_json

log = logging.getLogger("segplat")


class TensorBoardLogger(Tracker):
    """TensorBoard event files in `<run>/tensorboard` (or `log_dir/<run name>`): scalars, images, config as hparams +
    text."""

    name = "tensorboard"

    def __init__(self, log_dir: str | None = None, log_images: bool = True) -> None:
        require("tensorboard", "tensorboard")
        self.log_dir = log_dir
        self.images = bool(log_images)
        self.writer = None
        self.step = 0

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a shared log_dir gets one subfolder per run (TensorBoard's layout for comparing runs): written straight
        # into it, a new run purged the events of every earlier one
        own = Path(self.log_dir) / run.name if self.log_dir else run.run_dir / "tensorboard"
        if run.resuming:
            check_kept_folder((run.resume_state or {}).get("log_dir"), own, run.run_dir)
        folder = own  # from the config; a checkpoint never chooses where files are written
        self.log_dir = str(folder)
        self.step = run.resume_step
        if run.resuming:
            purge: int | None = run.resume_step + 1  # steps after the checkpoint are trained (and logged) again
        else:  # a fresh start in a folder with events of an earlier attempt hides those
            purge = 0 if folder.is_dir() and any(folder.glob("events.out.tfevents.*")) else None
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge)
        if not run.resuming:
            self._write_config(run)

    def _write_config(self, run: RunInfo) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = {k: v if isinstance(v, int | float | str | bool) else dumps_json(v, default=str)
                  for k, v in run.params.items()}
        params.update({f"sweep.{k}": v for k, v in run.sweep.items()})
        for summary in hparams(params, {run.monitor: math.nan, "val/loss": math.nan}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + dumps_json(run.config, default=str, indent=2) + "\n```", 0)
        if run.tags:
            self.writer.add_text("tags", ", ".join(run.tags), 0)
        if run.sweep:
            self.writer.add_text("sweep", ", ".join(f"{k}: {v}" for k, v in run.sweep.items()), 0)
        self.writer.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir} if self.writer is not None else {}

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        if self.writer is not None:
            self.step = step
            for key, value in numeric(record).items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.images:
            self._add_images(images, step)

    def _add_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.writer is not None:
            for tag, path in images.items():
                self.writer.add_image(tag, read_rgb(path), step, dataformats="HWC")
            self.writer.flush()

    def log_artifacts(self, files: Sequence[str | Path]) -> None:
        """The end-of-run plots, whatever `log_images` says (it is about the prediction panels, as in MLflow)."""
        self._add_images({f"plots/{Path(f).stem}": f for f in files}, self.step)

    def log_summary(self, facts: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add_text("summary", "\n\n".join(f"{k}: {v}" for k, v in facts.items()), self.step)
            self.writer.flush()

    def finish(self, status: str = "completed") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def check_kept_folder(kept: Any, own: Path, run_dir: Path) -> None:
    """The folder a resumed run's checkpoint kept for its events must be the one the config gives now: the run
    folder's `tensorboard/` (also when the run folder was moved) or `log_dir/<run name>`. Anything else, such as a
    crafted or copied `last.ckpt` naming another folder, is refused rather than followed or silently replaced."""
    if kept is None:
        return
    path = Path(kept) if isinstance(kept, str) and kept else None
    same = path is not None and (path.resolve() == own.resolve() or  # or its tensorboard/ before the folder moved
                                 (own == run_dir / "tensorboard" and path.parts[-2:] == (run_dir.name, "tensorboard")))
    if not same:
        raise CheckpointError(f"trainer.resume: the run's checkpoint keeps {kept!r} as its TensorBoard folder, but "
                              f"this config writes to {own} (logger.tensorboard.log_dir); a checkpoint never chooses "
                              "where files go: resume with the log_dir the run started with, or start a new run.")


def read_rgb(path: str | Path):
    """A PNG as an (H, W, 3) uint8 array."""
    import numpy as np
    from matplotlib.image import imread

    img = imread(str(path))
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)

