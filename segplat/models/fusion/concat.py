"""Concat fusion (`fusion.type=concat`): concatenate the streams' maps, project back with a 1x1 conv + BN + ReLU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from segplat.models.fusion.spec import StageFusion


class ConcatFusion(StageFusion):
    """Fuses one stage: streams of channels `in_channels` (any spatial sizes) -> `out_channels`.

    Streams at a coarser resolution than the first are upsampled to it bilinearly first.
    """

    fusion_type = "concat"

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__(in_channels, out_channels)
        self.proj = nn.Sequential(
            nn.Conv2d(sum(in_channels), out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        aligned = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                   for f in feats]
        return self.proj(torch.cat(aligned, dim=1))
