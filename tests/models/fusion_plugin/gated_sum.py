"""Gated-sum fusion (`fusion.type=gated_sum`): each stream is projected to the output width and scaled by a
learned per-channel gate (sigmoid), and the gated maps are summed. Written for the plug-in test only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from segplat.models.fusion import StageFusion


class GatedSumFusion(StageFusion):
    fusion_type = "gated_sum"

    def __init__(self, in_channels: Sequence[int], out_channels: int, gate_init: float = 0.0) -> None:
        super().__init__(in_channels, out_channels)
        self.proj = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.gates = nn.Parameter(torch.full((len(in_channels), out_channels), float(gate_init)))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        out = 0
        for proj, gate, f in zip(self.proj, torch.sigmoid(self.gates), feats):
            f = f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out = out + gate[None, :, None, None] * proj(f)
        return out
