"""`metrics.jsonl`: one JSON object per validation, always on (plots and resume read it)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segplat.engine.loggers.base import (
    RunInfo,
    Tracker,
)
from segplat.utils.io import atomic_write_text, dumps_json

log = logging.getLogger("segplat")


class JsonlLogger(Tracker):
    """One JSON object per validation in `<run>/metrics.jsonl`; always on (plots and resume read it)."""

    name = "jsonl"
    required = True

    def __init__(self) -> None:
        self.path: Path | None = None

    def start(self, run: RunInfo) -> None:
        self.path = run.run_dir / "metrics.jsonl"
        if run.resuming:
            self.truncate_after(run.resume_epoch)

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        assert self.path is not None, "start() first"
        with open(self.path, "a") as fh:
            fh.write(dumps_json(dict(record)) + "\n")  # NaN (an absent class) as null: strict JSON
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop records of epochs after the checkpoint, which will be trained again."""
        if self.path is None or not self.path.exists():
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

