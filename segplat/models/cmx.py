"""CMX (Zhang et al., T-ITS 2023): two MiT streams (RGB and X) rectified by FRMs and fused by FFMs.

Per stage: both streams run their MiT stage; an FRM rectifies each with the other and the
rectified maps feed the next stage; an FFM fuses the pair into the map the SegFormer MLP decoder
reads. Any of MiT-B0…B5 builds the variant it names (the official code's `mit_b1` builds B0's
dims, which cannot even run with B1's decoder channels, so no official B1 checkpoint exists; here each name
builds the SegFormer configuration it names). `pretrained` is a local file:
- an official CMX checkpoint (`.pth` of `huaaaliu/RGBX_Semantic_Segmentation`, MiT-B0…B5 + MLPDecoder):
  the whole model loads (`segplat.models.convert.cmx`), to the official logits; another class count keeps
  all but the classifier, said in one log line;
- a SegFormer/MiT checkpoint: both streams start from it, the X stream's first conv adapted to its
  channel count.

The decoder is the official one: the SegFormer MLP head with a biased fuse conv and BatchNorm eps 1e-3
(the official `C.bn_eps`; the FFMs' BatchNorms keep PyTorch's 1e-5, as officially).

The fusion is CMX's own and fixed (`fusion=frm_ffm`, which the preset selects); any other level or type
is refused. `fusion.stages` (null = all four) picks the stages that get an FRM and an FFM; at any other
stage no rectification happens and the decoder reads the RGB stream's map.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from segplat.models.base import SegmentationModel
from segplat.models.convert.cmx import is_official_cmx, load_cmx_official
from segplat.models.convert.mit import read_weights
from segplat.models.decoders.segformer_head import DecoderWidth, SegFormerHead, segformer_embed_dim
from segplat.models.encoders.mit import MiTName, build_mit
from segplat.models.fusion import FusionSpec
from segplat.models.fusion.cmx import FeatureFusionModule, FeatureRectifyModule, init_cmx_weights
from segplat.models.segmenter import SegmentationHead
from segplat.schema import Hint, NonNegativeFloat, OpenFraction

MIT_HEADS = (1, 2, 5, 8)
OFFICIAL_BN_EPS = 1e-3  # the official config's C.bn_eps, set on the decoder's BatchNorm by its init_weight


class CMX(SegmentationModel):
    """Exactly two modalities: the first is the RGB stream (output size), the second the X stream."""

    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"mid": ("frm_ffm",)}
    default_fusion: ClassVar[FusionSpec] = FusionSpec("mid", "frm_ffm")
    fixed_fusion = "an FRM and an FFM at each fused MiT stage"
    stream_roles = "RGB stream first, X stream second"

    def __init__(self, modalities: Mapping[str, int], num_classes: int, backbone: MiTName = "mit_b2",
                 pretrained: str | Path | None = None, decoder_embed_dim: DecoderWidth = 512, fusion: Any = None,
                 drop_path_rate: OpenFraction = 0.1, dropout: OpenFraction = 0.1,
                 lambda_c: Annotated[NonNegativeFloat, Hint("the FRM's channel-wise rectification weight")] = 0.5,
                 lambda_s: Annotated[NonNegativeFloat, Hint("the FRM's spatial rectification weight")] = 0.5) -> None:
        super().__init__(modalities, num_classes)
        f = self.check_fusion(fusion, len(self.modalities))
        self.encoders = nn.ModuleList(
            build_mit(backbone, in_chans=c, drop_path_rate=drop_path_rate) for c in self.modalities.values())
        self.backbone = self.encoders[0].name
        dims = self.encoders[0].out_channels
        self.fused_stages = f.fused_stages(len(dims), "the MiT pyramid")
        self.fusion = nn.ModuleDict({
            "frm": nn.ModuleDict({str(s): FeatureRectifyModule(dims[s], 1, lambda_c, lambda_s)
                                  for s in self.fused_stages}),
            "ffm": nn.ModuleDict({str(s): FeatureFusionModule(dims[s], MIT_HEADS[s]) for s in self.fused_stages}),
        })
        self.fusion.apply(init_cmx_weights)
        width = decoder_embed_dim or segformer_embed_dim(backbone)
        self.decoder = SegFormerHead(dims, self.encoders[0].reductions, width, fuse_bias=True,
                                     norm_eps=OFFICIAL_BN_EPS)
        self.head = SegmentationHead(width, num_classes, dropout)
        self.load_report: dict[str, list[str]] | None = None
        if pretrained:
            raw = read_weights(pretrained)
            if is_official_cmx(list(raw)):
                self.load_report = load_cmx_official(self, raw, pretrained)
            else:
                for encoder in self.encoders:
                    encoder.load_pretrained(pretrained, raw)

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
