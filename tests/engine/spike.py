"""Test parts a user could write in their own package: a loss term that turns non-finite at chosen training
steps, and a callback that breaks the weights while the loss stays finite."""

from __future__ import annotations

import torch
from torch import nn

from segplat.engine.callbacks import Callback


class Spike(nn.Module):
    """0 (on the graph) except at the training calls listed in `at` (0-based, counted in this process), where it is
    `value`: its gradient is then non-finite too, so a step that took it would break the weights."""

    def __init__(self, at: list[int], value: float = float("nan")) -> None:
        super().__init__()
        self.at = set(at)
        self.value = value
        self.calls = 0
        self.ignore_index = 255

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        zero = logits.float().mean() * 0
        if not torch.is_grad_enabled():  # validation
            return zero
        call, self.calls = self.calls, self.calls + 1
        return logits.float().mean() * self.value if call in self.at else zero


class BreakWeights(Callback):
    """Sets one weight to infinity at the end of training epoch `epoch` (before its validation and checkpoint)."""

    name = "break_weights"

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer) -> None:
        if trainer.state.epoch == self.epoch:
            with torch.no_grad():
                next(trainer.raw_model.parameters()).view(-1)[0] = float("inf")
