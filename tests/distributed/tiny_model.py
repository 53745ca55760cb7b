"""A BatchNorm-free segmentation net for the DDP equivalence test.

Why no BatchNorm: in training mode BatchNorm normalises with the statistics of each process's own
micro-batch, so 2 processes x b samples and 1 process x 2b samples legitimately compute different
gradients (SyncBatchNorm would fix that, but torch runs it on GPUs only). GroupNorm normalises each
sample on its own, so the two runs must agree up to float rounding: any difference is a bug in the
sharding, the gradient averaging, the accumulation or the metric reduction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from segplat.models.base import SegmentationModel


class GroupNormNet(SegmentationModel):
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...]]] = {"early": ("concat",)}

    def __init__(self, modalities: Mapping[str, int], num_classes: int, width: int = 8) -> None:
        super().__init__(modalities, num_classes)
        cin = sum(self.modalities.values())
        self.encoder = nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        x = torch.cat([inputs[m] for m in self.modalities], dim=1)
        return {"out": self.head(self.encoder(x))}


class BatchNormNet(GroupNormNet):
    """The same net with BatchNorm: 2 processes x b equal 1 x 2b only when BatchNorm is synchronised
    (`trainer.sync_batchnorm`, GPUs only)."""

    def __init__(self, modalities: Mapping[str, int], num_classes: int, width: int = 8) -> None:
        super().__init__(modalities, num_classes, width)
        cin = sum(self.modalities.values())
        self.encoder = nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
