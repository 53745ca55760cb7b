"""U-Net decoder: upsample the coarsest map, concatenate each skip, two 3x3 convs per stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from segplat.models.layers import conv_bn_act


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(cin + skip, cout, 3)
        self.conv2 = conv_bn_act(cout, cout, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """`encoder_channels`/`reductions` describe the pyramid (finest first). One block per skip level,
    each halving the stride; `channels` lists the blocks' widths from coarse to fine (its length is
    padded with its last value when the pyramid is deeper). Output stride = finest reduction."""

    def __init__(self, encoder_channels: Sequence[int], reductions: Sequence[int],
                 channels: Sequence[int] = (256, 128, 64, 32)) -> None:
        super().__init__()
        enc = list(encoder_channels)
        n_blocks = len(enc) - 1
        widths = list(channels)[:n_blocks]
        widths += [widths[-1]] * (n_blocks - len(widths))
        skips = enc[:-1][::-1]
        blocks, cin = [], enc[-1]
        for skip, cout in zip(skips, widths):
            blocks.append(DecoderBlock(cin, skip, cout))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = cin if blocks else enc[-1]
        self.output_stride = next(iter(reductions))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, list(feats[:-1])[::-1]):
            x = block(x, skip)
        return x
