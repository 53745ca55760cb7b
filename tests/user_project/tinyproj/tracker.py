"""A tracker of the user's own: one CSV row per validation, in the run folder."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segplat.engine.loggers import RunInfo, Tracker
from segplat.engine.loggers.base import numeric


class CsvTracker(Tracker):
    def __init__(self, filename: str = "tracked.csv") -> None:
        self.filename = filename
        self.path: Path | None = None
        self.status: str | None = None

    def start(self, run: RunInfo) -> None:
        self.path = Path(run.run_dir) / self.filename

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        assert self.path is not None
        row = {"step": step, **numeric(record)}
        new = not self.path.exists()
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def finish(self, status: str = "completed") -> None:
        if self.path is not None:
            self.path.with_suffix(".status").write_text(status)
