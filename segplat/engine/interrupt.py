"""Ctrl-C (SIGINT) and SIGTERM stop a run cleanly, in seconds, with no traceback.

While the trainer's loop runs (`deferred`), a signal only asks for a stop: the loop looks at each optimiser
step's end (every rank agrees through the step's one collective, so all stop at the same step), leaves the
unfinished epoch, keeps `checkpoints/last.ckpt` as the last complete validation wrote it (so
`trainer.resume=auto` continues exactly), writes `summary.json` with status `interrupted`, and the task exits
with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). Outside the loop (store preparation, model
building, the end-of-run plots) a signal stops the task at once, as `Interrupted`, with the same exit status.

A second signal more than `REPEAT_S` seconds after the first stops at once, even mid-step. A quicker one is
the same request delivered twice: a terminal's Ctrl-C reaches every process of the foreground group, and
torchrun forwards it to its ranks again.

Data-loader workers ignore both signals (`quiet_workers`): the main process decides, finishes its step and
shuts them down; a worker that died on Ctrl-C would otherwise fail the step being finished.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("segplat")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 3.0  # a second signal within this is the first one delivered again (terminal group + launcher)
STATUS = "interrupted"  # summary.json's status of a run stopped by a signal (the sweeper reads it)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by SIGINT or SIGTERM. A KeyboardInterrupt, so `except Exception` never swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)
        self.reported = False  # the trainer wrote summary.json and said why; the task only exits

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def signum_of(err: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (a plain one is Ctrl-C)."""
    return int(getattr(err, "signum", signal.SIGINT))


class _Guard:
    def __init__(self) -> None:
        self.deferred = 0  # > 0 inside the trainer's loop
        self.signum: int | None = None  # the stop asked for (first signal), until `clear`
        self.at = 0.0


_guard = _Guard()


def _handler(signum: int, frame: Any) -> None:
    now = time.monotonic()
    if _guard.deferred > 0:
        if _guard.signum is None:
            _guard.signum, _guard.at = signum, now
            from segplat.utils.dist import is_main_process

            if is_main_process():
                log.warning("%s: stopping at the end of this training step (send it again after %.0f s to stop at "
                            "once)", signal_name(signum), REPEAT_S)
            return
        if now - _guard.at < REPEAT_S:
            return
    raise Interrupted(signum)


@contextmanager
def signals_handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise end the process with no cleanup at all), or
    inside `deferred` ask for a stop. Only the main thread can handle signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside, a signal asks for a stop (`requested`) that the trainer honours at a step's end."""
    with signals_handled():
        _guard.deferred += 1
        try:
            yield
        finally:
            _guard.deferred -= 1


def requested() -> int | None:
    """The signal that asked for a stop on this process, or None."""
    return _guard.signum


def clear() -> None:
    _guard.signum = None


def quiet_workers(loader: Any) -> None:
    """Make the loader's worker processes ignore SIGINT and SIGTERM (see the module docstring). Workers still end
    with the main process: PyTorch's workers watch their parent."""
    init = getattr(loader, "worker_init_fn", None)
    if getattr(loader, "num_workers", 0) == 0 or (isinstance(init, functools.partial) and init.func is _ignore_then):
        return
    loader.worker_init_fn = functools.partial(_ignore_then, init)


def _ignore_then(init: Callable[[int], Any] | None, worker_id: int) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if init is not None:
        init(worker_id)
