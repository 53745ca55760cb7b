"""A plain `nn.Module`: no segplat base class, only the model contract (dict of modalities in, logits out)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from segplat.schema import PositiveInt


class TinyNet(nn.Module):
    """Stacks the modalities (early fusion), two convolutions at half resolution, logits at full resolution.

    Parameters under `encoder` form the encoder group, the rest the decoder group (segplat's default)."""

    def __init__(self, modalities: dict[str, int], num_classes: int, width: PositiveInt = 8) -> None:
        super().__init__()
        self.names = list(modalities)
        self.encoder = nn.Sequential(
            nn.Conv2d(sum(modalities.values()), width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([inputs[m] for m in self.names], dim=1)
        return F.interpolate(self.head(self.encoder(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)
