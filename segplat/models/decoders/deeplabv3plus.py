"""DeepLabV3+ decoder (Chen et al. 2018) for the generic Segmenter, on any pyramid encoder.

ASPP (rates 12/24/36 + image pooling, 256 channels) on the deepest map; the stride-4 map projected to 48
channels (so the low-level detail does not outweigh the 256 semantic channels); the ASPP output upsampled to
stride 4, concatenated, two 3x3 conv + BN + ReLU. The atrous and decoder 3x3 convs are depth-wise separable
(`separable=True`, the default), as in the paper and segmentation_models_pytorch: with a ResNet-50 and 6
classes the model has 26,678,614 parameters against smp 0.6.0's 26,678,870 (256 fewer: smp's pooling branch
has a BatchNorm where ours has a conv bias); `separable=False` gives plain 3x3 convs (40,348,070).
The Segmenter's head and its final resize give the x4 upsampling to the input. With `model=deeplabv3plus` the
encoder runs at output stride 16 (timm dilates the last stage, so a ResNet pyramid has reductions
[2, 4, 8, 16, 16]); the decoder only needs *a* level at the low-level stride and takes the deepest map
whatever its stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from annotated_types import MinLen
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.decoders.aspp_gated import ASPP
from segplat.models.layers import conv_bn_act
from segplat.schema import Hint, OpenFraction, PositiveInt


class DeepLabV3PlusDecoder(nn.Module):
    """`encoder_channels`/`reductions` describe the pyramid (finest first).

    `channels` is the ASPP and decoder width; a list (as the U-Net presets and shared overrides such as
    `model.decoder.channels=[16,16,16,16]` give) uses its first value, since DeepLabV3+ has one width.
    """

    def __init__(self, encoder_channels: Sequence[int], reductions: Sequence[int],
                 channels: Annotated[PositiveInt | Annotated[Sequence[PositiveInt], MinLen(1)],
                                     Hint("one width (a list: its first value)")] = 256,
                 rates: Annotated[Sequence[PositiveInt], Hint("ASPP's atrous rates")] = (12, 24, 36),
                 low_level_channels: PositiveInt = 48,
                 low_level_stride: Annotated[PositiveInt, Hint("a reduction of the encoder pyramid")] = 4,
                 aspp_dropout: OpenFraction = 0.5, separable: bool = True) -> None:
        super().__init__()
        width = int(channels) if isinstance(channels, int) else int(next(iter(channels)))
        reductions = [int(r) for r in reductions]
        if low_level_stride not in reductions[:-1]:
            raise ConfigError(f"model.decoder.low_level_stride={low_level_stride} is not a level of the encoder "
                              f"pyramid (reductions {reductions}); choose one of {sorted(set(reductions[:-1]))}.")
        self.low_index = reductions.index(low_level_stride)
        # the only pyramid levels it reads: a mid fusion elsewhere would build modules that never run
        self.levels_read = (self.low_index, len(reductions) - 1)
        self.aspp = ASPP(encoder_channels[-1], width, rates, dropout=aspp_dropout, separable=separable)
        self.low_project = conv_bn_act(encoder_channels[self.low_index], low_level_channels, 1)
        self.fuse = nn.Sequential(conv_bn_act(width + low_level_channels, width, 3, separable=separable),
                                  conv_bn_act(width, width, 3, separable=separable))
        self.out_channels = width
        self.output_stride = low_level_stride

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        low = self.low_project(feats[self.low_index])
        x = self.aspp(feats[-1])
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, low], dim=1))
