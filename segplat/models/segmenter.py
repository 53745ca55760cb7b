"""Segmenter = encoders (one per stream) + fusion + decoder + head, at fusion level early/mid/late.

- early: the modalities are concatenated along channels into one encoder;
- mid:   one encoder per modality; at each fused stage the fusion module the config names
         (`fusion.module`: concat, attention or any other `StageFusion`) merges the streams' maps
         (stages not listed in `fusion.stages` pass the primary stream's map on); one decoder;
- late:  a full encoder + decoder branch per modality; the branches' final features are fused
         by the config's module (concat).

Streams of a lower resolution than the primary one (e.g. a 64x64 grid under a 512x512 image) are
upsampled to the primary input size before an early concat, and their features are resized in
the fusion modules.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.base import SegmentationModel
from segplat.schema import OpenFraction


@functools.lru_cache(maxsize=16)
def _pyramid_depth(encoder_yaml: str) -> int:
    """An encoder class that knows its depth from its config alone says so (`pyramid_depth(config)`: GFMs, which
    cannot be built without band names); any other is probed with one input channel and no weights."""
    encoder = OmegaConf.create(encoder_yaml)
    declared = getattr(get_class(encoder._target_), "pyramid_depth", None)
    if declared is not None:
        return int(declared(encoder))
    encoder._partial_ = True
    if "pretrained" in encoder:
        encoder.pretrained = None
    return len(instantiate(encoder)(in_chans=1).out_channels)


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
    # mid: any fusion type with a per-stage module (concat, attention, ... as conf/fusion defines them)
    builds_stage_modules = True
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {
        "early": ("concat",), "mid": None, "late": ("concat",)}

    def __init__(self, modalities: Mapping[str, int], num_classes: int, encoder: Callable[..., nn.Module],
                 decoder: Callable[..., nn.Module], fusion: Any = None, head_dropout: OpenFraction = 0.0,
                 bands: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(modalities, num_classes)
        f = self.check_fusion(fusion, len(self.modalities))
        self.level = f.level
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
        if self.level == "late":
            self.decoders = nn.ModuleDict({m: decoder(encoder_channels=self.encoders[m].out_channels,
                                                      reductions=self.encoders[m].reductions) for m in names})
            width = self.decoders[names[0]].out_channels
            self.fusion = nn.ModuleDict({"final": f.build([d.out_channels for d in self.decoders.values()], width)})
        else:
            self.decoder = decoder(encoder_channels=channels, reductions=reductions)
            width = self.decoder.out_channels
        if self.level == "mid":
            self.fused_stages = self._stages_to_fuse(f, n_stages, first)
            self.fusion = nn.ModuleDict({
                str(s): f.build([self.encoders[m].out_channels[s] for m in names], channels[s])
                for s in self.fused_stages
            })
        self.head = SegmentationHead(width, num_classes, head_dropout)

    def _stages_to_fuse(self, f: Any, n_stages: int, encoder: nn.Module) -> list[int]:
        """The fused stages, every one of which is used: only levels the decoder reads (DeepLabV3+ reads two), and
        with an encoder whose levels are made side by side (a GFM's neck) every level the decoder reads."""
        stages = f.fused_stages(n_stages, "the encoder's pyramid")
        read = sorted(getattr(self.decoder, "levels_read", range(n_stages)))
        decoder_name = type(self.decoder).__name__
        if f.stages is None:
            stages = read
        elif unread := [s for s in stages if s not in read]:
            raise ConfigError(f"fusion.stages={list(f.stages)} fuses stage(s) {unread}, which {decoder_name} never "
                              f"reads (it reads {read}); list stages among those, or null for all of them.")
        if getattr(encoder, "parallel_levels", False) and sorted(stages) != read:
            raise ConfigError(f"fusion.stages={list(f.stages)}: {type(encoder).__name__} makes its levels side by "
                              f"side, so a second stream's level that is not fused is never used; fuse every level "
                              f"{decoder_name} reads ({read}): fusion.stages=null.")
        return stages

    @classmethod
    def fusion_stage_count(cls, config: Mapping[str, Any]) -> int | None:
        """The encoder's pyramid depth: a structural probe of `model.encoder` (one input channel, no weights)."""
        encoder = config.get("encoder")
        if encoder is None or "_target_" not in encoder:
            return None
        return _pyramid_depth(OmegaConf.to_yaml(encoder, resolve=True))

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
