"""SegFormer's all-MLP decoder: per-stage linear projection, upsample to 1/4, concat, 1x1 fuse.

As in the NVlabs/mmseg head (and transformers' SegformerDecodeHead): each stage is projected to
`embed_dim` before upsampling (cheap: the projection runs at the stage's own resolution), the maps
are concatenated coarsest first, fused by a bias-free 1x1 conv + BatchNorm + ReLU. The classifier
(dropout + 1x1 conv) belongs to the model. The MLP on tokens equals a 1x1 conv on the map.

The official CMX code builds the same head with two differences, both kept by CMX here: the fuse conv has a
bias (`fuse_bias=True`) and its BatchNorm eps is 1e-3 (`norm_eps`, the CMX config's `C.bn_eps`), which
alone moves logits by ~3.5e-3 with equal weights. `segplat.models.convert.segformer_head` loads the heads of
transformers, NVlabs/mmseg 0.x and CMX checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import nn
from torch.nn import functional as F

from segplat.schema import Hint, PositiveInt

# a model's `decoder_embed_dim`
DecoderWidth = Annotated[PositiveInt | None, Hint("null = the paper's width: 256 for MiT-B0/B1, 768 for B2+")]


def segformer_embed_dim(backbone: str) -> int:
    """The paper's decoder width: 256 for MiT-B0/B1, 768 for B2 and larger."""
    return 256 if str(backbone).lower().replace("-", "_") in ("mit_b0", "mit_b1") else 768


class SegFormerHead(nn.Module):
    """`encoder_channels`/`reductions` describe the pyramid (finest first); output at the finest stride."""

    def __init__(self, encoder_channels: Sequence[int], reductions: Sequence[int], embed_dim: int = 256,
                 fuse_bias: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in encoder_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(encoder_channels), embed_dim, 1, bias=fuse_bias),
            nn.BatchNorm2d(embed_dim, eps=norm_eps),
            nn.ReLU(inplace=True),
        )
        self.out_channels = embed_dim
        self.output_stride = next(iter(reductions))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        maps = []
        for proj, f in zip(self.proj, feats):
            y = proj(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            maps.append(y)
        return self.fuse(torch.cat(maps[::-1], dim=1))
