"""U-Net decoder: upsample the coarsest map, concatenate each skip, two 3x3 convs per stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.layers import conv_bn_act
from segplat.schema import Hint, PositiveInt


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
    each halving the stride; `channels` lists the blocks' widths from coarse to fine (at most one per block; a
    shorter list is padded with its last value; None: 256 halved per block down to 32). Output stride = finest
    reduction."""

    def __init__(self, encoder_channels: Sequence[int], reductions: Sequence[int],
                 channels: Annotated[Sequence[PositiveInt] | None,
                                     Hint("block widths, coarse to fine; null = 256 halved per block")] = None) -> None:
        super().__init__()
        enc = list(encoder_channels)
        n_blocks = len(enc) - 1
        if channels is None:  # 256, halved per block down to 32
            channels = [max(32, 256 >> i) for i in range(n_blocks)]
        if len(list(channels)) > n_blocks:  # the extra widths were cut off without a word
            raise ConfigError(f"model.decoder.channels={list(channels)} lists {len(list(channels))} block widths, but "
                              f"the encoder's {len(enc)}-level pyramid gives {n_blocks} decoder blocks; list at most "
                              f"{n_blocks} (a shorter list repeats its last width).")
        widths = list(channels)
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
