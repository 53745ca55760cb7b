"""Run one trial as its own process: `python -m segplat.train <overrides> hydra.run.dir=<trial dir>`.

Why a process and not Hydra's launcher in this process: each trial gets a fresh Accelerate state
(Accelerate's `PartialState` is a process-wide singleton, and torch keeps allocator, thread and
CUDA state), a crash (segfault, out of memory, a ConfigError exit) takes down only the trial, and
a trial can itself be a multi-process job (`launcher_cmd: [torchrun, --nproc-per-node, "2"]`).
The result is read from the run's summary.json; the process's stderr tail becomes the error of a
failed trial. While the trial runs, the sweeper keeps the study's heartbeat for it.

Where the process runs is the `start` argument's business: a local child process (`LocalTrial`, the
default) or a cluster job (segplat/sweep/cluster.py); both are watched by the same loop here (heartbeat,
time limit, a stop request from the sweeper).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class TrialResult:
    returncode: int | None
    summary: dict[str, Any] | None
    stderr_tail: str
    seconds: float
    timed_out: bool = False
    error_line: str = ""  # the cause in one line (first_error_line of the whole stderr.log)
    ended: str = ""  # how a trial without an exit code ended (a cluster job cancelled, lost, ...)
    facts: dict[str, Any] = field(default_factory=dict)  # where it ran (a cluster job's id)


class TrialStopped(KeyboardInterrupt):
    """The sweeper asked a running trial to stop (it was interrupted while this trial ran in a thread)."""


class TrialHandle(Protocol):
    """A started trial: a local process or a cluster job."""

    returncode: int | None
    ended: str
    facts: dict[str, Any]

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds`; True once the trial has ended."""

    def running_since(self) -> float | None:
        """time.monotonic() when it started to run (None while it waits in a queue)."""

    def stop(self) -> None: ...

    def close(self) -> None: ...

    def scheduler_log(self) -> str:
        """What the scheduler kept of a trial that never wrote its own stderr.log."""


def _die_with_parent() -> None:
    """Linux: the trial gets SIGTERM if the sweeper dies (e.g. SIGKILL), so no orphan trains on."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def trial_command(overrides: Sequence[str], launcher_cmd: Sequence[str] | None, module: str) -> list[str]:
    prefix = list(launcher_cmd) if launcher_cmd else [sys.executable]
    return [*prefix, "-m", module, *overrides]


def _read(path: Path, max_bytes: int = 1 << 20) -> str:
    """The end of a log file (progress bars can make stderr large; the cause is at the end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar's carriage returns keep only the last redraw."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]


HYDRA_HINT = "HYDRA_FULL_ERROR"
JOB_ERROR = "Error executing job with overrides:"
TRACEBACK = "Traceback (most recent call last):"


def _with_continuation(lines: list[str], i: int) -> str:
    """Line i, joined with the next one when it only introduces it (`Error in call to target 'x':`)."""
    line = lines[i].strip()
    if line.endswith(":") and i + 1 < len(lines) and lines[i + 1].strip():
        line = f"{line} {lines[i + 1].strip()}"
    return line


def _exception_line(lines: list[str]) -> int | None:
    """The index of a traceback's exception line (`ValueError: ...`): the first unindented line after the
    last `  File "..."` frame."""
    frames = [i for i, line in enumerate(lines) if re.match(r'\s+File "', line)]
    if not frames:
        return None
    for i in range(frames[-1] + 1, len(lines)):
        if lines[i] and not lines[i][0].isspace():
            return i
    return None


def first_error_line(text: str) -> str:
    """The first line of the real error in a trial's stderr, never Hydra's `HYDRA_FULL_ERROR` hint.

    In order: segplat's own `error: ...` sentence; the exception line of the last traceback; the first
    line of the message Hydra prints (after "Error executing job with overrides" or before its hint);
    else the last line written."""
    lines = [line for line in _lines(text) if HYDRA_HINT not in line]
    for line in lines:
        if line.startswith("error: "):
            return line[len("error: "):].strip()
    start = max((i for i, line in enumerate(lines) if line.startswith((JOB_ERROR, TRACEBACK))), default=-1)
    found = _exception_line(lines[start + 1:]) if start >= 0 else _exception_line(lines)
    if found is not None:
        return _with_continuation(lines, found + (start + 1 if start >= 0 else 0))
    if start >= 0 and lines[start].startswith(JOB_ERROR):
        following = [i for i in range(start + 1, len(lines)) if lines[i].strip()]
        if following:
            return _with_continuation(lines, following[0])
    if HYDRA_HINT in text:  # a composition error: Hydra's message is the last paragraph before its hint
        non_empty = [i for i, line in enumerate(lines) if line.strip()]
        if non_empty:
            first = non_empty[-1]
            while first - 1 >= 0 and lines[first - 1].strip():
                first -= 1
            return _with_continuation(lines, first)
    rest = [line.strip() for line in lines if line.strip()]
    return rest[-1] if rest else ""


class LocalTrial:
    """The trial as a child process of the sweeper, in its own process group, dying with the sweeper."""

    def __init__(self, cmd: Sequence[str], run_dir: Path, env: dict[str, str]) -> None:
        self.ended, self.facts = "", {}
        self._files = (open(run_dir / "stdout.log", "wb"), open(run_dir / "stderr.log", "wb"))  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(list(cmd), stdout=self._files[0], stderr=self._files[1],
                                         env={**os.environ, **env}, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except BaseException:
            self.close()
            raise
        self.started = time.monotonic()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait(self, seconds: float) -> bool:
        try:
            self.proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def running_since(self) -> float | None:
        return self.started

    def stop(self) -> None:
        _stop(self.proc)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def scheduler_log(self) -> str:
        return ""


def run_trial(overrides: Sequence[str], run_dir: Path, env: dict[str, str], launcher_cmd: Sequence[str] | None = None,
              module: str = "segplat.train", timeout: float | None = None, heartbeat: Callable[[], None] | None = None,
              heartbeat_every: float = 30.0, stderr_lines: int = 30, stop: threading.Event | None = None,
              start: Callable[[Sequence[str], Path, dict[str, str]], TrialHandle] = LocalTrial,
              on_start: Callable[[dict[str, Any]], None] | None = None) -> TrialResult:
    """Start the trial, keep the heartbeat while it runs, and collect summary.json and stderr.

    `timeout` counts from when the trial runs (a cluster job's time in the queue is not counted); `stop`, set by
    the sweeper from another thread, stops the trial and raises TrialStopped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():  # a re-used folder must not lend its old result to this trial
        summary_path.unlink()
    cmd = trial_command([*overrides, f"hydra.run.dir={run_dir}"], launcher_cmd, module)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    begin = time.monotonic()
    timed_out = False
    handle = start(cmd, run_dir, env)
    try:
        if on_start is not None:
            on_start(handle.facts)
        last_beat = 0.0
        while not handle.wait(1.0):
            now = time.monotonic()
            if heartbeat is not None and now - last_beat >= heartbeat_every:
                heartbeat()
                last_beat = now
            since = handle.running_since()
            if timeout is not None and since is not None and now - since > timeout:
                timed_out = True
                handle.stop()
                break
            if stop is not None and stop.is_set():
                raise TrialStopped()
    except BaseException:  # Ctrl-C or SIGTERM of the sweeper: the trial goes with it
        handle.stop()
        raise
    finally:
        handle.close()
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = None
    stderr = _read(run_dir / "stderr.log") or handle.scheduler_log()
    return TrialResult(handle.returncode, summary, "\n".join(_lines(stderr)[-stderr_lines:]),
                       time.monotonic() - begin, timed_out, first_error_line(stderr), handle.ended, dict(handle.facts))


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
