"""wandb, offline by default."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from segplat.engine.loggers.base import (
    GOOD_ENDS,
    RunInfo,
    Tracker,
    numeric,
    require,
)
from segplat.errors import ConfigError

log = logging.getLogger("segplat")


class WandbLogger(Tracker):
    """wandb, offline by default (no network; `wandb sync <run>/wandb/offline-run-*` uploads later)."""

    name = "wandb"

    def __init__(self, mode: str = "offline", project: str = "segplat", entity: str | None = None,
                 group: str | None = None, tags: Sequence[str] | None = None, job_type: str | None = None) -> None:
        if mode not in ("offline", "online"):
            raise ConfigError(f"logger.wandb.mode={mode!r} is not known; use offline or online (logger=none for no "
                              "wandb).")
        require("wandb", "wandb")
        self.mode, self.project, self.entity, self.group, self.job_type = mode, project, entity, group, job_type
        self.tags = list(tags or [])
        self.run = None
        self.step = 0

    def start(self, run: RunInfo) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = (run.resume_state or {}).get("run_id")
        config = {**run.config, "sweep": run.sweep} if run.sweep else run.config
        self.step = run.resume_step
        self.run = wandb.init(project=self.project, entity=self.entity, group=self.group or run.sweep.get("study_name"),
                              job_type=self.job_type, tags=sorted({*run.tags, *self.tags}), dir=str(run.run_dir),
                              mode=self.mode, id=run_id, resume="allow" if run_id else None, name=run.name,
                              config=config, reinit="finish_previous")

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run.id} if self.run is not None else {}

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        if self.run is not None:
            self.step = step
            self.run.log(numeric(record), step=step)

    def log_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Image(str(v)) for k, v in images.items()}, step=step)

    def log_artifacts(self, files: Sequence[str | Path]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({f"plots/{Path(f).stem}": wandb.Image(str(f)) for f in files}, step=self.step)

    def log_summary(self, facts: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in facts.items() if v is not None})

    def finish(self, status: str = "completed") -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status in GOOD_ENDS else 1)
            self.run = None

