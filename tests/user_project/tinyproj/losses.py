"""A loss term of the user's own: a soft Jaccard (IoU) loss on the pixels that have a label."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from segplat.losses import LossTerm
from segplat.schema import PositiveFloat


class SoftJaccard(LossTerm):
    """1 - mean over classes of soft IoU; `LossTerm` hands `compute` only the labelled pixels' mask."""

    def __init__(self, smooth: PositiveFloat = 1.0, ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.smooth = float(smooth)

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(1) * valid[:, None]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float() * valid[:, None]
        inter = (probs * onehot).sum((0, 2, 3))
        union = (probs + onehot).sum((0, 2, 3)) - inter
        return 1 - ((inter + self.smooth) / (union + self.smooth)).mean()
