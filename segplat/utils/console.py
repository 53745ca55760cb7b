"""Lines a task prints on the console are kept in its log file too (`<run>/train.log`, Hydra's file handler).

Log records (`log.info`, `log.warning`) reach both through Hydra's job logging already; what a task prints
itself (the epoch line, `run_dir: PATH`, `error: ...`, a table) and Python warnings did not reach the file.
`say` prints a line as before (through tqdm, so an open progress bar is not torn) and hands the same line to
the root logger's file handlers only, so the console does not show it twice. Progress bars stay console-only.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

# the logger name a console line carries in the log file
RECORD = logging.getLogger("segplat.console")
RECORD.propagate = False  # never to the console handler: the line is printed already


def file_handlers() -> list[logging.Handler]:
    """The root logger's file handlers: Hydra's `<run>/<task>.log` (none outside a Hydra task)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def to_log_file(text: str, level: int = logging.INFO) -> None:
    """Write `text` to the task's log file only (at the root logger's level: the main process's INFO)."""
    if not logging.getLogger().isEnabledFor(level):
        return
    record = RECORD.makeRecord(RECORD.name, level, __file__, 0, text, (), None)
    for handler in file_handlers():
        if record.levelno >= handler.level:
            handler.handle(record)


def say(text: str, err: bool = False) -> None:
    """Print a line on stdout (stderr with `err`) and keep it in the task's log file."""
    stream = sys.stderr if err else sys.stdout
    tqdm.write(text, file=stream)
    stream.flush()
    to_log_file(text, logging.ERROR if err else logging.INFO)


@contextmanager
def warnings_logged() -> Iterator[None]:
    """Python warnings are shown as before and kept in the log file (they never reached it)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        shown(message, category, filename, lineno, file, line)
        to_log_file(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), logging.WARNING)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def traceback_to_log_file(err: BaseException) -> None:
    """An unexpected error's traceback in the log file (Hydra prints it on the console only)."""
    to_log_file("".join(traceback.format_exception(err)).rstrip(), logging.ERROR)
