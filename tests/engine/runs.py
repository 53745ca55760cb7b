"""Tiny `python -m segplat.train` runs for the engine's process-level tests (signals, non-finite loss, the log)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import TINY

# TINY without early stopping, plots or prediction panels: the runs compare metrics, not pictures
QUICK = [*TINY, "callbacks.early_stopping=null", "callbacks.visuals=null", "callbacks.report=null",
         "trainer.mixed_precision=no"]


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "segplat.train", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    """A run in its own process group (as a terminal's foreground job is), its output in files under `cwd`."""
    return subprocess.Popen(train_cmd(args), cwd=cwd, env=env(), stdout=open(cwd / "stdout.txt", "w"),
                            stderr=open(cwd / "stderr.txt", "w"), start_new_session=True)


def wait_until(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.time() > end:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
