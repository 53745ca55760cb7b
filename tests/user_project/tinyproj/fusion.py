"""A fusion module of the user's own: per-stream 1x1 projections, then the element-wise maximum."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from segplat.models.fusion import StageFusion


class MaxFusion(StageFusion):
    fusion_type = "tinymax"

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__(in_channels, out_channels)
        self.proj = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        maps = [p(f) if f.shape[-2:] == size else F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
                for p, f in zip(self.proj, feats)]
        return torch.stack(maps).amax(0)
