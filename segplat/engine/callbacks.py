"""Callbacks: best/last checkpoints and early stopping, driven by one monitored metric.

Decisions use the metrics after they are summed across ranks, so every rank takes the same one
(no rank waits for a checkpoint or a stop that another rank skipped). State is saved in each
checkpoint and restored on resume.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Annotated, Any

from segplat.schema import Hint, NonNegativeFloat, PositiveInt

if TYPE_CHECKING:
    from segplat.engine.trainer import Trainer

log = logging.getLogger(__name__)


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class Callback:
    """Hooks the trainer calls; override what you need. `state_dict` goes into checkpoints."""

    name = "callback"
    order = 0  # the trainer calls callbacks in ascending order (stable)

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_train_epoch_start(self, trainer: Trainer) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer) -> None: ...
    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelCheckpoint(Callback):
    """Writes checkpoints/last.ckpt (the full resume state) after every validation and checkpoints/best.ckpt
    (weights, data facts, config) when the monitored metric improves (the trainer tracks the best score)."""

    name = "checkpoint"
    order = 100  # after every other callback, so the saved callback state includes this validation

    def __init__(self, save_last: bool = True, save_best: bool = True) -> None:
        self.save_last = save_last
        self.save_best = save_best

    def on_fit_start(self, trainer: Trainer) -> None:
        # last.ckpt is written before best.ckpt: a kill between the two leaves best.ckpt one improvement behind.
        # Resumed at that epoch, the restored weights are the best ones: write them (idempotent when complete).
        if self.save_best and trainer.resumed and trainer.state.best_epoch == trainer.state.epoch:
            trainer.save_checkpoints(last=False, best=True)

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        trainer.save_checkpoints(last=self.save_last,
                                 best=self.save_best and trainer.state.best_epoch == trainer.state.epoch)


class EarlyStopping(Callback):
    """Stops when the monitored metric has not improved by `min_delta` for `patience` validations."""

    name = "early_stopping"

    def __init__(self, patience: Annotated[PositiveInt, Hint("validations without improvement; to train every "
                                                             "epoch, set callbacks.early_stopping=null")] = 5,
                 min_delta: Annotated[NonNegativeFloat, Hint("the smallest change that counts as an improvement")]
                 = 0.0) -> None:
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.wait = 0

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics.get(trainer.monitor)
        if improved(value, self.best, trainer.mode, self.min_delta):
            self.best = value
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.request_stop(f"early stopping: {trainer.monitor} has not improved for {self.wait} validations")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))
