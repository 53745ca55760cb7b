"""ASPP + attention-gated skips + ConvNeXt refinement: the dual-stream model's decoder (and the ASPP module
that DeepLabV3+ reuses).

- `ASPP` (DeepLabV3, Chen et al. 2017): a 1x1 branch, one 3x3 atrous branch per rate and an image-pooling
  branch, concatenated and projected by 1x1 conv + BN + ReLU + dropout. The pooling branch has no
  BatchNorm (a 1x1 map with one sample per device would make BN fail in training) but a bias instead.
- `AttentionGate` (Attention U-Net, Oktay et al. 2018): additive attention
  alpha = sigmoid(psi(ReLU(theta(skip) + phi(g)))) with the decoder's coarser map g as the gating signal,
  upsampled to the skip's size (so alpha is computed at the skip's full resolution), and skip * alpha.
- `ASPPGatedDecoder`: ASPP on the deepest map, then per finer level: upsample, gate the skip, concatenate,
  1x1 projection and ConvNeXt blocks. `forward_all` returns every stage's map (for auxiliary heads);
  `forward` returns the finest, so the decoder also plugs into the generic Segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.encoders.convnext_stream import ConvNeXtBlock
from segplat.models.layers import conv_bn_act


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling on one map; output has `out_channels` channels at the input's size."""

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (12, 24, 36),
                 dropout: float = 0.5, separable: bool = False) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_act(in_channels, out_channels, 1)])
        for r in rates:
            self.branches.append(conv_bn_act(in_channels, out_channels, 3, dilation=int(r), separable=separable))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU())
        self.project = nn.Sequential(conv_bn_act(out_channels * (len(rates) + 2), out_channels, 1),
                                     nn.Dropout(dropout) if dropout else nn.Identity())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class AttentionGate(nn.Module):
    """Weights a skip map by an additive attention map computed from the skip and a coarser gating map."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        inter = inter_channels or max(8, skip_channels // 2)
        self.theta = nn.Sequential(nn.Conv2d(skip_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.phi = nn.Sequential(nn.Conv2d(gate_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.psi = nn.Conv2d(inter, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        g = self.phi(gate)
        if g.shape[-2:] != skip.shape[-2:]:
            g = F.interpolate(g, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(skip) + g)))
        return skip * alpha


class RefineStage(nn.Module):
    """Upsample the coarser map, gate and concatenate the skip, project, refine with ConvNeXt blocks."""

    def __init__(self, cin: int, skip: int, cout: int, depth: int = 1, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.gate = AttentionGate(skip, cin)
        self.project = conv_bn_act(cin + skip, cout, 1, act=nn.GELU)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cout, drop_path_rate) for _ in range(depth)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        gated = self.gate(skip, x)
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.blocks(self.project(torch.cat([x, gated], dim=1)))


class ASPPGatedDecoder(nn.Module):
    """`encoder_channels`/`reductions`: the pyramid, finest first. `channels`: the refinement stages' widths
    from coarse to fine (padded with its last value when the pyramid is deeper).

    `rates` default to (3, 6, 9): DeepLab's (12, 24, 36) at output stride 8 scaled to the stride-32 map this
    decoder's ASPP sees on a MiT pyramid (a 512 input gives a 16x16 map, where rate 36 would only see padding).
    """

    def __init__(self, encoder_channels: Sequence[int], reductions: Sequence[int],
                 channels: Sequence[int] = (256, 128, 64), aspp_channels: int = 256,
                 rates: Sequence[int] = (3, 6, 9), aspp_dropout: float = 0.1, depth: int = 1,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        enc = list(encoder_channels)
        if len(enc) < 2:
            raise ConfigError(f"the ASPP-gated decoder needs a pyramid of at least 2 levels, got {enc}.")
        n = len(enc) - 1
        if len(list(channels)) > n:  # the extra widths were cut off without a word
            raise ConfigError(f"model.decoder.channels={list(channels)} lists {len(list(channels))} stage widths, but "
                              f"the vision pyramid's {len(enc)} levels give {n} decoder stages; list at most {n}.")
        widths = list(channels) or [aspp_channels]
        widths += [widths[-1]] * (n - len(widths))
        self.aspp = ASPP(enc[-1], aspp_channels, rates, dropout=aspp_dropout)
        stages, cin = [], aspp_channels
        for skip, cout in zip(enc[:-1][::-1], widths):
            stages.append(RefineStage(cin, skip, cout, depth, drop_path_rate))
            cin = cout
        self.stages = nn.ModuleList(stages)
        #: per output of `forward_all` (coarse -> fine): channels and stride relative to the input
        self.stage_channels: list[int] = [aspp_channels, *widths]
        self.stage_reductions: list[int] = list(reductions)[::-1]
        self.out_channels = widths[-1]
        self.output_stride = int(next(iter(reductions)))

    def forward_all(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = self.aspp(feats[-1])
        outs = [x]
        for stage, skip in zip(self.stages, list(feats[:-1])[::-1]):
            x = stage(x, skip)
            outs.append(x)
        return outs

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_all(feats)[-1]
