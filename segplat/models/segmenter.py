"""Segmenter = encoders (one per stream) + fusion + decoder + head, at fusion level early/mid/late.

- early: the modalities are concatenated along channels into one encoder;
- mid:   one encoder per modality; at each fused stage a fusion module merges the streams' maps
         (stages not listed in `fusion.stages` pass the primary stream's map on); one decoder;
- late:  a full encoder + decoder branch per modality; the branches' final features are fused.

Streams of a lower resolution than the primary one (e.g. a 64x64 grid under a 512x512 image) are
upsampled to the primary input size before an early concat, and their features are resized in
the fusion modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.base import SegmentationModel
from segplat.models.fusion.attention import AttentionFusion
from segplat.models.fusion.concat import ConcatFusion

FUSION_MODULES: dict[str, type[nn.Module]] = {"concat": ConcatFusion, "attention": AttentionFusion}


def build_encoder(factory: Callable[..., nn.Module], in_chans: int,
                  bands: Mapping[str, Sequence[str]] | None) -> nn.Module:
    """Only encoders that declare a `bands` keyword (geo-foundation models, which map the dataset's band names onto
    their pretrained bands) get the stream's band names: {modality: names}, in channel order."""
    if "bands" in inspect.signature(factory).parameters:
        return factory(in_chans=in_chans, bands=bands)
    return factory(in_chans=in_chans)


class SegmentationHead(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Dropout2d(dropout) if dropout else nn.Identity(), nn.Conv2d(in_channels, num_classes, 1))


class Segmenter(SegmentationModel):
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "early": ("concat",), "mid": ("concat", "attention"), "late": ("concat",)}

    def __init__(self, modalities: Mapping[str, int], num_classes: int, encoder: Callable[..., nn.Module],
                 decoder: Callable[..., nn.Module], fusion: Any = None, head_dropout: float = 0.0,
                 bands: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(modalities, num_classes)
        f = self.check_fusion(fusion, len(self.modalities))
        self.level = f["level"]
        names = list(self.modalities)
        if self.level == "early":
            self.encoders = nn.ModuleDict({"stack": build_encoder(
                encoder, sum(self.modalities.values()), bands and {m: bands[m] for m in names})})
        else:
            self.encoders = nn.ModuleDict({m: build_encoder(encoder, c, bands and {m: bands[m]})
                                           for m, c in self.modalities.items()})
        first = self.encoders[next(iter(self.encoders))]
        channels, reductions = list(first.out_channels), list(first.reductions)
        n_stages = len(channels)
        if self.level == "mid":
            stages = f["stages"] if f["stages"] is not None else list(range(n_stages))
            bad = [s for s in stages if not 0 <= int(s) < n_stages]
            if bad:
                raise ConfigError(f"fusion.stages={list(stages)} names stages outside 0..{n_stages - 1} of this "
                                  "encoder's pyramid.")
            self.fused_stages = sorted(int(s) for s in stages)
            self.fusion = nn.ModuleDict({
                str(s): FUSION_MODULES[f["type"]]([self.encoders[m].out_channels[s] for m in names], channels[s])
                for s in self.fused_stages
            })
        if self.level == "late":
            self.decoders = nn.ModuleDict({m: decoder(encoder_channels=self.encoders[m].out_channels,
                                                      reductions=self.encoders[m].reductions) for m in names})
            width = self.decoders[names[0]].out_channels
            self.fusion = nn.ModuleDict({"final": ConcatFusion([d.out_channels for d in self.decoders.values()],
                                                               width)})
        else:
            self.decoder = decoder(encoder_channels=channels, reductions=reductions)
            width = self.decoder.out_channels
        self.head = SegmentationHead(width, num_classes, head_dropout)

    def param_group(self, name: str) -> str:
        head = name.split(".", 1)[0]
        if head == "encoders":  # an encoder's randomly initialised parts (a GFM's neck) train with the decoder
            parts = name.split(".", 3)
            heads = getattr(self.encoders[parts[1]], "head_modules", ()) if len(parts) > 2 else ()
            return "decoder" if heads and parts[2] in heads else "encoder"
        if head == "fusion":
            return "fusion"
        return "decoder"

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        names = list(self.modalities)
        size = inputs[names[0]].shape[-2:]
        if self.level == "early":
            xs = [inputs[m] if inputs[m].shape[-2:] == size else
                  F.interpolate(inputs[m], size=size, mode="bilinear", align_corners=False) for m in names]
            feats = self.encoders["stack"](torch.cat(xs, dim=1))
            x = self.decoder(feats)
        elif self.level == "mid":
            pyramids = [self.encoders[m](inputs[m]) for m in names]
            feats = []
            for s, primary in enumerate(pyramids[0]):
                if s in self.fused_stages:
                    feats.append(self.fusion[str(s)]([p[s] for p in pyramids]))
                else:
                    feats.append(primary)
            x = self.decoder(feats)
        else:
            finals = [self.decoders[m](self.encoders[m](inputs[m])) for m in names]
            x = self.fusion["final"](finals)
        logits = self.head(x)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return {"out": logits}
