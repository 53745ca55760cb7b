"""Attention fusion (`fusion.type=attention`, mid level): a softmax over the streams, per channel and pixel.

Each stream's map is projected to the stage's width (1x1 conv + BN + ReLU) and resized to the primary
stream's size. From all projected maps together, a channel branch (squeeze-and-excitation MLP on the global
average) and a spatial branch (1x1 then 3x3 conv) each give one logit per stream; their sum, softmaxed over
the streams, weights the projected maps:

    w[s, c, y, x] = softmax_s(channel[s, c] + spatial[s, y, x]),   out = sum_s w[s] * p[s]

Why a softmax over streams rather than independent sigmoid gates: the streams compete, so where one is
uninformative (a cloud over the optical bands, speckle in SAR, a nodata hole) its weight can go to zero while
the other takes over, and the output stays a convex combination, on the scale of a single stream whatever
the number of streams, so the decoder sees the same input distribution as with one encoder. The last layer of
both branches is zero-initialised: training starts from the plain average of the streams and learns where to
prefer which. `stream_weights(feats)` returns w for inspection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import nn

from segplat.errors import ConfigError
from segplat.models.fusion.film_gate import resample_to
from segplat.models.fusion.spec import StageFusion
from segplat.schema import Hint, PositiveInt


class AttentionFusion(StageFusion):
    """Fuses one stage: streams of channels `in_channels` (any spatial sizes) -> `out_channels` at the first's size."""

    fusion_type = "attention"

    def __init__(self, in_channels: Sequence[int], out_channels: int,
                 reduction: Annotated[PositiveInt, Hint("squeeze ratio of the channel and spatial branches")] = 4,
                 ) -> None:
        super().__init__(in_channels, out_channels)
        n = len(in_channels)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                          nn.ReLU(inplace=True)) for c in in_channels)
        both = n * out_channels
        mid = max(8, both // reduction)
        self.channel = nn.Sequential(nn.Linear(both, mid), nn.ReLU(inplace=True), nn.Linear(mid, both))
        self.spatial = nn.Sequential(nn.Conv2d(both, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                                     nn.Conv2d(mid, n, 3, padding=1))
        for last in (self.channel[-1], self.spatial[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.num_streams = n

    def _project(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != self.num_streams:
            raise ConfigError(f"attention fusion was built for {self.num_streams} streams but got {len(feats)}.")
        size = feats[0].shape[-2:]
        return torch.stack([p(resample_to(f, size)) for p, f in zip(self.proj, feats)], dim=1)  # (B, S, C, H, W)

    def _weights(self, projected: torch.Tensor) -> torch.Tensor:
        b, s, c, h, w = projected.shape
        flat = projected.reshape(b, s * c, h, w)
        channel = self.channel(flat.mean(dim=(2, 3))).reshape(b, s, c, 1, 1)
        spatial = self.spatial(flat).reshape(b, s, 1, h, w)
        return torch.softmax(channel + spatial, dim=1)

    def stream_weights(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, streams, C, H, W) weights, summing to 1 over the streams."""
        return self._weights(self._project(feats))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        projected = self._project(feats)
        return (self._weights(projected) * projected).sum(dim=1)
