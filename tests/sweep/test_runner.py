"""The trial runner: one process per trial, its summary or its stderr, time limits, heartbeats."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from segplat.sweep.runner import run_trial, trial_command

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}


def test_command_with_a_launcher() -> None:
    assert trial_command(["a=1"], None, "segplat.train") == [sys.executable, "-m", "segplat.train", "a=1"]
    assert trial_command(["a=1"], ["torchrun", "--nproc-per-node", "2"], "segplat.train") == [
        "torchrun", "--nproc-per-node", "2", "-m", "segplat.train", "a=1"]


def test_summary_crash_and_stale_summary(tmp_path: Path) -> None:
    ok = run_trial(["ok"], tmp_path / "t", ENV, module="tests.sweep.fake_task")
    assert ok.returncode == 0 and ok.summary is not None
    assert (ok.summary["status"], ok.summary["best_score"]) == ("completed", 0.5)
    # a crash in the same folder must not be read as the old success
    bad = run_trial(["crash"], tmp_path / "t", ENV, module="tests.sweep.fake_task", stderr_lines=5)
    assert bad.returncode == 2 and bad.summary is None and "dataset.root" in bad.stderr_tail
    assert (tmp_path / "t" / "command.txt").read_text().split()[-1] == f"hydra.run.dir={tmp_path / 't'}"


@pytest.mark.slow
def test_time_limit_kills_the_trial_and_heartbeats_run(tmp_path: Path) -> None:
    beats: list[float] = []
    start = time.monotonic()
    res = run_trial(["sleep"], tmp_path / "s", ENV, module="tests.sweep.fake_task", timeout=2.5,
                    heartbeat=lambda: beats.append(time.monotonic()), heartbeat_every=1.0)
    assert res.timed_out and res.summary is None and time.monotonic() - start < 20
    assert len(beats) >= 2
