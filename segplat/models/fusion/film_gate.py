"""FiLM + dynamic gating: an auxiliary stream modulates the vision stream's map at one stage.

The auxiliary (air-quality) features are resampled to the vision map's size, then predict per-channel,
per-location FiLM parameters (Perez et al., 2018: x' = gamma * x + beta) and a gate that decides where and in
which channels the modulated map replaces the plain one:

    a    = GELU(BN(conv1x1(resample(air))))
    m    = (1 + dgamma(a)) * v + beta(a)
    g    = sigmoid(spatial(concat(v, a)) + channel(GAP(concat(v, a))) + b0)
    out  = v + g * (m - v)

Initialisation keeps the vision stream unchanged: `dgamma` and `beta` are zero-initialised (gamma = 1,
beta = 0, so m = v and out = v exactly, whatever the gate), and the gate starts mostly closed (b0 = -2,
sigmoid = 0.12). A gate driven fully shut (sigmoid -> 0) would also zero the FiLM parameters' gradient
(d out / d dgamma = g * v) and stall training at the identity; 0.12 keeps the start gentle but live.
The gate is dynamic: its spatial and channel logits are computed from both streams on every input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def resample_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize a map to `size`: bilinear when enlarging, area averaging when shrinking (no aliasing)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FiLMGateFusion(nn.Module):
    """Fuses (vision, aux) at one stage; returns a map shaped like the vision map."""

    def __init__(self, vis_channels: int, aux_channels: int, hidden: int | None = None, reduction: int = 4,
                 gate_bias_init: float = -2.0) -> None:
        super().__init__()
        hidden = hidden or vis_channels
        self.embed = nn.Sequential(nn.Conv2d(aux_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU())
        self.gamma = nn.Conv2d(hidden, vis_channels, 1)
        self.beta = nn.Conv2d(hidden, vis_channels, 1)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        both = vis_channels + hidden
        mid = max(8, both // reduction)
        self.spatial_gate = nn.Sequential(nn.Conv2d(both, mid, 1), nn.GELU(), nn.Conv2d(mid, 1, 3, padding=1))
        self.channel_gate = nn.Sequential(nn.Linear(both, mid), nn.GELU(), nn.Linear(mid, vis_channels))
        self.gate_bias = nn.Parameter(torch.full((vis_channels,), float(gate_bias_init)))

    def forward(self, vis: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        a = self.embed(resample_to(aux, vis.shape[-2:]))
        modulated = (1.0 + self.gamma(a)) * vis + self.beta(a)
        both = torch.cat([vis, a], dim=1)
        logits = (self.spatial_gate(both) + self.channel_gate(both.mean(dim=(2, 3)))[:, :, None, None]
                  + self.gate_bias[None, :, None, None])
        gate = torch.sigmoid(logits)
        return vis + gate * (modulated - vis)
