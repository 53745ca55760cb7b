"""A ConvNeXt pyramid encoder for a low-resolution, many-channel modality (e.g. a 64x64x48 air-quality grid).

How the resolution gap is handled: an air-quality grid cell already covers many image pixels (a 64x64 grid
under a 512x512 image is one cell per 8x8 pixels), so downsampling it the way an image backbone does (stride
4 stem, 32x in total) would leave nothing. This stream therefore

- embeds the grid with a 1x1 convolution (spectral/chemical mixing per cell, no spatial stride), so stage 1
  keeps the grid's native resolution;
- uses per-stage `strides` (default 1, 1, 2, 2): stages 1-2 at the native grid size, stages 3-4 halving it,
  so for the canonical 64-grid under a 512-image the air maps are 64/64/32/16 against vision maps of
  128/64/32/16: stages 2-4 line up exactly and stage 1 is off by 2x;
- leaves the remaining alignment to the fusion modules, which resample each air map to the vision stage's
  size (bilinear up, area down) for FiLM, or attend over the air tokens at their own resolution with shared
  geographic coordinate embeddings for cross-attention.

Downsampling uses a 3x3 stride-2 convolution (not ConvNeXt's 2x2 patchify) so odd grid sizes lose no cells.
The blocks are the ConvNeXt ones (7x7 depth-wise conv, LayerNorm, 4x inverted MLP with GELU, layer scale,
stochastic depth; LayerNorm2d and DropPath from timm), also used by the ASPP-gated decoder's refinement stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath, LayerNorm2d
from torch import nn

from segplat.errors import ConfigError


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LN -> Linear(4C) -> GELU -> Linear(C) -> layer scale -> drop path, residual."""

    def __init__(self, dim: int, drop_path_rate: float = 0.0, layer_scale_init: float = 1e-6,
                 kernel_size: int = 7, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtStream(nn.Module):
    """Pyramid encoder: `forward(x)` returns one map per stage (finest first).

    `out_channels` lists the stages' widths; `reductions` their strides relative to the *grid* (1, 1, 2, 4 by
    default), not to the image: the fusion modules align the maps to the vision stream by size.
    """

    def __init__(self, in_chans: int, dims: Sequence[int] = (64, 128, 192, 256), depths: Sequence[int] = (2, 2, 2, 2),
                 strides: Sequence[int] = (1, 1, 2, 2), drop_path_rate: float = 0.0,
                 layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        if in_chans < 1:
            raise ConfigError(f"the air stream needs at least one input channel, got in_chans={in_chans}.")
        if not (len(dims) == len(depths) == len(strides)) or not dims:
            raise ConfigError(f"model.air.dims={list(dims)}, depths={list(depths)} and strides={list(strides)} must "
                              "have the same, non-zero length.")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 1), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        cin, start, reduction = dims[0], 0, 1
        self.reductions: list[int] = []
        for dim, depth, stride in zip(dims, depths, strides):
            if stride == 1 and cin == dim:
                self.transitions.append(nn.Identity())
            elif stride == 1:
                self.transitions.append(nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, dim, 1)))
            else:
                self.transitions.append(nn.Sequential(LayerNorm2d(cin, eps=1e-6),
                                                      nn.Conv2d(cin, dim, 3, stride=2, padding=1)))
            self.stages.append(nn.Sequential(*[ConvNeXtBlock(dim, rates[start + i], layer_scale_init)
                                               for i in range(depth)]))
            reduction *= stride
            self.reductions.append(reduction)
            cin, start = dim, start + depth
        self.out_channels: list[int] = list(dims)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for transition, stage in zip(self.transitions, self.stages):
            x = stage(transition(x))
            feats.append(x)
        return feats


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d | nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
