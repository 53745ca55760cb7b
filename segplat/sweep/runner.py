"""Run one trial as its own process: `python -m segplat.train <overrides> hydra.run.dir=<trial dir>`.

Why a process and not Hydra's launcher in this process: each trial gets a fresh Accelerate state
(Accelerate's `PartialState` is a process-wide singleton, and torch keeps allocator, thread and
CUDA state), a crash (segfault, out of memory, a ConfigError exit) takes down only the trial, and
a trial can itself be a multi-process job (`launcher_cmd: [torchrun, --nproc-per-node, "2"]`).
The result is read from the run's summary.json; the process's stderr tail becomes the error of a
failed trial. While the trial runs, the sweeper keeps the study's heartbeat for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrialResult:
    returncode: int | None
    summary: dict[str, Any] | None
    stderr_tail: str
    seconds: float
    timed_out: bool = False


def _die_with_parent() -> None:
    """Linux: the trial gets SIGTERM if the sweeper dies (e.g. SIGKILL), so no orphan trains on."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def trial_command(overrides: Sequence[str], launcher_cmd: Sequence[str] | None, module: str) -> list[str]:
    prefix = list(launcher_cmd) if launcher_cmd else [sys.executable]
    return [*prefix, "-m", module, *overrides]


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def run_trial(overrides: Sequence[str], run_dir: Path, env: dict[str, str], launcher_cmd: Sequence[str] | None = None,
              module: str = "segplat.train", timeout: float | None = None, heartbeat: Callable[[], None] | None = None,
              heartbeat_every: float = 30.0, stderr_lines: int = 30) -> TrialResult:
    """Start the trial, keep the heartbeat while it runs, and collect summary.json and stderr."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():  # a re-used folder must not lend its old result to this trial
        summary_path.unlink()
    cmd = trial_command([*overrides, f"hydra.run.dir={run_dir}"], launcher_cmd, module)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    start = time.monotonic()
    timed_out = False
    with open(run_dir / "stdout.log", "wb") as out, open(run_dir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **env}, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            last_beat = 0.0
            while True:
                try:
                    proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if heartbeat is not None and now - last_beat >= heartbeat_every:
                    heartbeat()
                    last_beat = now
                if timeout is not None and now - start > timeout:
                    timed_out = True
                    _stop(proc)
                    break
        except BaseException:  # Ctrl-C or SIGTERM of the sweeper: the trial goes with it
            _stop(proc)
            raise
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = None
    return TrialResult(proc.returncode, summary, tail(run_dir / "stderr.log", stderr_lines),
                       time.monotonic() - start, timed_out)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group (torchrun and its ranks too), then SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
