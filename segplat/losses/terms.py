"""Single loss terms. Each takes logits (B, C, H, W) and target (B, H, W) and honours `ignore_index`:
ignored pixels change neither the value nor the gradient, and a batch with no valid pixel gives 0."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class LossTerm(nn.Module):
    """Base for terms; `ignore_index` is set by SegLoss from the dataset so it is one value everywhere."""

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)


class CrossEntropyLoss(LossTerm):
    def __init__(self, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
                 ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32)
                             if class_weights is not None else None, persistent=False)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        if not valid.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)
