"""What every `python -m segplat.<task>` shares: error reporting, the run folder, the last line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segplat.errors import SegplatError
from segplat.utils.dist import is_main_process

log = logging.getLogger("segplat")


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: Hydra's output dir (the same on every rank, see launch/)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (tests composing configs directly)
        return Path(cfg.paths.output_dir)


def user_error_in(err: BaseException | None) -> SegplatError | None:
    """The SegplatError behind `err`, following the cause chain (Hydra wraps errors raised in constructors)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, SegplatError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def task_wrapper(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn user errors into one sentence and exit status 2; print `run_dir: PATH` last."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> Any:
        if not is_main_process():
            logging.getLogger().setLevel(logging.WARNING)
        try:
            result = fn(cfg)
        except Exception as err:
            user_error = user_error_in(err)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(2)
        if is_main_process():
            print(f"run_dir: {run_dir_of(cfg)}", flush=True)
        return result

    return wrapped


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    from segplat.utils.io import atomic_write_text

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
