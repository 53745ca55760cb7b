"""SegFormer (Xie et al., NeurIPS 2021): a MiT encoder and the all-MLP decoder, one stream.

Multi-modal inputs are fused early: the modalities are concatenated along channels (coarser streams
upsampled to the primary size first) and the first patch embedding takes them all; pretrained
3-channel weights are adapted to that channel count.

`pretrained` (a local transformers, NVlabs/mmseg 0.x or segplat SegFormer checkpoint) loads the encoder and,
when the file has one, the decode head: with the same class count the classifier too (logits equal
transformers' `SegformerForSemanticSegmentation`), with another class count everything but the classifier,
said in one log line. A head of another width is refused naming `model.decoder_embed_dim`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from segplat.models.base import SegmentationModel
from segplat.models.convert.mit import read_weights
from segplat.models.convert.segformer_head import load_segformer_head
from segplat.models.decoders.segformer_head import DecoderWidth, SegFormerHead, segformer_embed_dim
from segplat.models.encoders.mit import MiTName, build_mit
from segplat.models.segmenter import SegmentationHead
from segplat.schema import OpenFraction


class SegFormer(SegmentationModel):
    """`backbone` names the MiT variant (mit_b0 … mit_b5); `decoder_embed_dim=None` takes the paper's width."""

    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"early": ("concat",)}

    def __init__(self, modalities: Mapping[str, int], num_classes: int, backbone: MiTName = "mit_b0",
                 pretrained: str | Path | None = None, decoder_embed_dim: DecoderWidth = None, fusion: Any = None,
                 drop_path_rate: OpenFraction = 0.1, dropout: OpenFraction = 0.1) -> None:
        super().__init__(modalities, num_classes)
        self.check_fusion(fusion, len(self.modalities))
        self.encoder = build_mit(backbone, in_chans=sum(self.modalities.values()), drop_path_rate=drop_path_rate)
        width = decoder_embed_dim or segformer_embed_dim(backbone)
        self.decoder = SegFormerHead(self.encoder.out_channels, self.encoder.reductions, width)
        self.head = SegmentationHead(width, num_classes, dropout)
        self.head_report: dict[str, object] | None = None
        if pretrained:
            raw = read_weights(pretrained)  # one read for the encoder and the head
            self.encoder.load_pretrained(pretrained, raw)
            self.head_report = load_segformer_head(self.decoder, self.head[-1], raw, pretrained)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        size = inputs[self.primary].shape[-2:]
        xs = [inputs[m] if inputs[m].shape[-2:] == size else
              F.interpolate(inputs[m], size=size, mode="bilinear", align_corners=False) for m in self.modalities]
        logits = self.head(self.decoder(self.encoder(torch.cat(xs, dim=1))))
        return {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
