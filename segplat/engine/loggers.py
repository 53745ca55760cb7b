"""Run loggers: console lines, `metrics.jsonl` (always), and wandb (offline unless switched on)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segplat.utils.io import atomic_write_text, dumps_json

log = logging.getLogger("segplat")


def format_metrics(epoch: int, max_epochs: int, metrics: Mapping[str, float], keys: list[str]) -> str:
    parts = [f"epoch {epoch}/{max_epochs}"]
    for k in keys:
        if k in metrics and metrics[k] is not None:
            v = metrics[k]
            parts.append(f"{k} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}")
    return " | ".join(parts)


class JsonlLogger:
    """Appends one JSON object per validation to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(dumps_json(dict(record)) + "\n")  # NaN (an absent class) as null: strict JSON
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop records of epochs after the checkpoint, which will be trained again."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if int(rec.get("epoch", 0)) <= epoch:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


class WandbLogger:
    """wandb in offline mode by default (no network); the run id is kept for resume."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], enabled: bool = True, mode: str = "offline",
                 project: str = "segplat", entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, run_id: str | None = None, name: str | None = None) -> None:
        self.run = None
        if not enabled or mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, entity=entity, group=group, tags=list(tags or []), dir=str(run_dir),
                              mode=mode, id=run_id, resume="allow" if run_id else None, name=name,
                              config=dict(config), reinit="finish_previous")

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def log_images(self, images: Mapping[str, str], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
