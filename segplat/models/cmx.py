"""CMX (Zhang et al., T-ITS 2023): two MiT streams (RGB and X) rectified by FRMs and fused by FFMs.

Per stage: both streams run their MiT stage; an FRM rectifies each with the other and the
rectified maps feed the next stage; an FFM fuses the pair into the map the SegFormer MLP decoder
reads. Any of MiT-B0…B5 builds the variant it names (the official code's `mit_b1` builds B0's
dims; here each name is checked against the SegFormer configuration). Both streams can start from
one SegFormer checkpoint (`pretrained`), the X stream's first conv adapted to its channel count.

The fusion is CMX's own and fixed (`fusion=frm_ffm`, which the preset selects); any other level or type
is refused. `fusion.stages` (null = all four) picks the stages that get an FRM and an FFM; at any other
stage no rectification happens and the decoder reads the RGB stream's map.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from segplat.models.base import SegmentationModel
from segplat.models.decoders.segformer_head import SegFormerHead, segformer_embed_dim
from segplat.models.encoders.mit import build_mit
from segplat.models.fusion import FusionSpec
from segplat.models.fusion.cmx import FeatureFusionModule, FeatureRectifyModule, init_cmx_weights
from segplat.models.segmenter import SegmentationHead

MIT_HEADS = (1, 2, 5, 8)


class CMX(SegmentationModel):
    """Exactly two modalities: the first is the RGB stream (output size), the second the X stream."""

    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"mid": ("frm_ffm",)}
    default_fusion: ClassVar[FusionSpec] = FusionSpec("mid", "frm_ffm")
    fixed_fusion = "an FRM and an FFM at each fused MiT stage"
    stream_roles = "RGB stream first, X stream second"

    def __init__(self, modalities: Mapping[str, int], num_classes: int, backbone: str = "mit_b2",
                 pretrained: str | Path | None = None, decoder_embed_dim: int | None = 512, fusion: Any = None,
                 drop_path_rate: float = 0.1, dropout: float = 0.1, lambda_c: float = 0.5,
                 lambda_s: float = 0.5) -> None:
        super().__init__(modalities, num_classes)
        f = self.check_fusion(fusion, len(self.modalities))
        self.encoders = nn.ModuleList(
            build_mit(backbone, in_chans=c, pretrained=pretrained, drop_path_rate=drop_path_rate)
            for c in self.modalities.values())
        dims = self.encoders[0].out_channels
        self.fused_stages = f.fused_stages(len(dims), "the MiT pyramid")
        self.fusion = nn.ModuleDict({
            "frm": nn.ModuleDict({str(s): FeatureRectifyModule(dims[s], 1, lambda_c, lambda_s)
                                  for s in self.fused_stages}),
            "ffm": nn.ModuleDict({str(s): FeatureFusionModule(dims[s], MIT_HEADS[s]) for s in self.fused_stages}),
        })
        self.fusion.apply(init_cmx_weights)
        width = decoder_embed_dim or segformer_embed_dim(backbone)
        self.decoder = SegFormerHead(dims, self.encoders[0].reductions, width)
        self.head = SegmentationHead(width, num_classes, dropout)

    @classmethod
    def fusion_stage_count(cls, config: Mapping[str, Any]) -> int:
        return len(MIT_HEADS)  # every MiT variant has four stages

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        rgb_name, x_name = list(self.modalities)
        rgb, x = inputs[rgb_name], inputs[x_name]
        size = rgb.shape[-2:]
        if x.shape[-2:] != size:  # FRM mixes the streams pixel by pixel: bring X to the RGB grid first
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        fused = []
        for s, (stage_rgb, stage_x) in enumerate(zip(self.encoders[0].stages, self.encoders[1].stages)):
            rgb, x = stage_rgb(rgb), stage_x(x)
            if s in self.fused_stages:
                rgb, x = self.fusion["frm"][str(s)](rgb, x)
                fused.append(self.fusion["ffm"][str(s)](rgb, x))
            else:
                fused.append(rgb)
        logits = self.head(self.decoder(fused))
        return {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
