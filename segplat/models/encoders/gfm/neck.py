"""ViT tokens -> a feature pyramid, so that CNN decoders (U-Net, DeepLabV3+) take a GFM encoder.

A ViT keeps one token grid (stride = patch size, e.g. 16) at every block. The pyramid takes the tokens
of `out_indices` blocks (one per level, shallow to deep), drops class/register tokens, reshapes them to
(B, D, H/p, W/p) and brings level i to stride `strides[i]` of the input:

- `learned`: ViTDet's simple feature pyramid: 2x transposed convolutions up (each halving the width),
  2x2 max-pooling down, an identity at the patch stride; then, if `channels` is set, a 1x1 conv + BN
  per level. Its weights start from random, so they train with the decoder (see `head_modules`).
- `interpolate`: bilinear resizing only (no weights unless `channels` asks for a 1x1 projection).

Each level is finally cropped to the unpadded input (the encoder pads inputs to a multiple of the
patch) and resized to exactly ceil(H / stride), so patch sizes that are not a power of two (14) work too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from annotated_types import MinLen
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.schema import Hint, PositiveInt

NeckKind = Annotated[Literal["learned", "interpolate"],
                     Hint("learned: ViTDet's simple feature pyramid; interpolate: bilinear only")]
Strides = Annotated[Sequence[PositiveInt], MinLen(1), Hint("the levels' input strides, finest first")]
NeckChannels = Annotated[PositiveInt | Sequence[PositiveInt] | None,
                         Hint("per-level widths after a 1x1 projection (or one for all); null = the neck's own")]


def default_out_indices(depth: int, levels: int) -> list[int]:
    """`levels` blocks evenly spaced over a ViT of `depth` blocks, the last one last (12, 4 -> 2, 5, 8, 11)."""
    return [round((i + 1) * depth / levels) - 1 for i in range(levels)]


class _Level(nn.Module):
    """Brings one token map from the patch stride to a target stride (powers of two up or down)."""

    def __init__(self, dim: int, steps: int, channels: int | None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        if steps > 0:  # upsample 2^steps
            for i in range(steps):
                out = max(width // 2, 1)
                layers.append(nn.ConvTranspose2d(width, out, kernel_size=2, stride=2))
                if i < steps - 1:
                    layers += [nn.BatchNorm2d(out), nn.GELU()]
                width = out
        elif steps < 0:
            layers += [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(-steps)]
        if channels is not None:
            layers += [nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)]
            width = channels
        self.body = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ViTPyramidNeck(nn.Module):
    """Token maps at the patch stride -> `len(strides)` maps at the given input strides (finest first)."""

    def __init__(self, dim: int, patch_size: int, strides: Strides = (4, 8, 16, 32), kind: NeckKind = "learned",
                 channels: NeckChannels = None) -> None:
        super().__init__()
        strides = [int(s) for s in strides]
        if strides != sorted(strides):
            raise ConfigError(f"model.encoder.strides={strides} must be positive and increasing (finest first), "
                              "e.g. [4, 8, 16, 32].")
        if isinstance(channels, int):
            channels = [channels] * len(strides)
        if channels is not None and len(channels) != len(strides):
            raise ConfigError(f"model.encoder.neck_channels={list(channels)} must give one width per level of "
                              f"strides={strides}, or one number, or null.")
        self.kind, self.strides, self.patch_size = kind, strides, patch_size
        widths = list(channels) if channels is not None else [None] * len(strides)
        if kind == "learned":
            self.levels = nn.ModuleList(
                _Level(dim, round(math.log2(patch_size / s)), None if w is None else int(w))
                for s, w in zip(strides, widths))
            self.out_channels = [lvl.out_channels for lvl in self.levels]
        else:
            self.levels = nn.ModuleList(
                nn.Identity() if w is None else nn.Sequential(nn.Conv2d(dim, int(w), 1, bias=False),
                                                              nn.BatchNorm2d(int(w)))
                for w in widths)
            self.out_channels = [dim if w is None else int(w) for w in widths]

    def forward(self, maps: Sequence[torch.Tensor], size: tuple[int, int],
                padded: tuple[int, int]) -> list[torch.Tensor]:
        if len(maps) != len(self.strides):
            raise ValueError(f"the neck has {len(self.strides)} levels but got {len(maps)} token maps")
        h, w = size
        out = []
        for level, x, stride in zip(self.levels, maps, self.strides):
            target = (math.ceil(h / stride), math.ceil(w / stride))
            if self.kind == "learned":
                x = level(x)
            else:
                grid = (math.ceil(padded[0] / stride), math.ceil(padded[1] / stride))
                x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
            # crop away the padding (the valid fraction of the padded grid), then match the exact stride
            keep = (math.ceil(x.shape[-2] * h / padded[0]), math.ceil(x.shape[-1] * w / padded[1]))
            x = x[..., :keep[0], :keep[1]]
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            out.append(x if self.kind == "learned" else level(x))
        return out
