"""DualStream: a MiT-B1 vision stream + a ConvNeXt stream for a low-resolution, many-channel modality.

Built for an optical image over an air-quality grid (e.g. a 512x512x4 image with a 64x64x48 grid), but it
takes any two modalities: the first is the vision stream (the output has its size), the second the
auxiliary stream (its channel count comes from the dataset's second modality).

- Vision stream: MiT-B1 (`segplat.models.encoders.mit`), or any pyramid encoder via `vision_encoder`.
  With MiT the streams are fused *inside* the encoder: each stage's fused map feeds the next stage (as in
  CMX); other encoders are fused level by level after they run.
- Air stream (`ConvNeXtStream`): keeps the grid's native resolution (1x1 stem, stage strides 1/1/2/2);
  see `segplat.models.encoders.convnext_stream` for how the resolution gap is handled.
- Fusion: FiLM + dynamic gating at stages 1-2 (`FiLMGateFusion`: the air map is resampled to the vision
  stage's size), cross-attention at stages 3-4 (`CrossAttentionFusion`: visual queries over air tokens at
  their own resolution, shared ground-coordinate embeddings). Both start as the identity (gamma = 1,
  beta = 0; zero output projection), so at initialisation the model *is* the vision-only model and the
  air stream is blended in as training finds it useful (`forward_vision_only` gives that path).
  The fusion is the model's own and fixed (`fusion=film_cross_attention`, which the preset selects); any
  other level or type is refused; `fusion.stages` picks the fused stages, `film_stages` which of them use FiLM.
- Decoder (`ASPPGatedDecoder`): ASPP on the stride-32 map, attention-gated skips, ConvNeXt refinement
  at each upsampling stage. In training mode auxiliary heads return "f2" (decoder map at stride 8) and
  "f3" (stride 16), the names the loss's `aux_weights` use (final 1.0, f2 0.3, f3 0.15).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.base import SegmentationModel
from segplat.models.decoders.aspp_gated import ASPPGatedDecoder
from segplat.models.encoders.convnext_stream import ConvNeXtStream
from segplat.models.fusion import FusionSpec
from segplat.models.fusion.cross_attention import CrossAttentionFusion
from segplat.models.fusion.film_gate import FiLMGateFusion
from segplat.models.segmenter import SegmentationHead
from segplat.schema import Hint, NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveInt, section
from segplat.utils.plain import to_plain

# the loss weights of the auxiliary heads unless loss.aux_weights says otherwise (the final head weighs 1)
AUX_DEFAULT_WEIGHTS = {"f2": 0.3, "f3": 0.15}


@section
class AirOptions:
    """`model.air`: the ConvNeXt stream (`ConvNeXtStream`); a key left out or null takes its default, one stage per
    vision stage."""

    dims: Sequence[PositiveInt] | None = None
    depths: Sequence[NonNegativeInt] | None = None
    strides: Annotated[Sequence[Literal[1, 2]] | None, Hint("per stage: 1 keeps the grid's size, 2 halves it")] = None
    drop_path_rate: OpenFraction | None = None
    layer_scale_init: NonNegativeFloat | None = None


@section
class DecoderOptions:
    """`model.decoder`: the ASPP-gated decoder (`ASPPGatedDecoder`); a key left out or null takes its default."""

    channels: Annotated[Sequence[PositiveInt] | None, Hint("the refinement stages' widths, coarse to fine")] = None
    aspp_channels: PositiveInt | None = None
    rates: Sequence[PositiveInt] | None = None
    aspp_dropout: OpenFraction | None = None
    depth: NonNegativeInt | None = None
    drop_path_rate: OpenFraction | None = None


def _given(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keys of a section the config sets (a DictConfig or dict; null = the default)."""
    return {k: v for k, v in dict(to_plain(options or {})).items() if v is not None}


def _default_vision_encoder(in_chans: int, pretrained: str | None = None) -> nn.Module:
    from segplat.models.encoders.mit import mit_b1

    return mit_b1(in_chans=in_chans, pretrained=pretrained)


class DualStream(SegmentationModel):
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"mid": ("film_cross_attention",)}
    default_fusion: ClassVar[FusionSpec] = FusionSpec("mid", "film_cross_attention")
    fixed_fusion = "FiLM + gating at model.film_stages, cross-attention at the other fused stages"
    stream_roles = "image first, then the low-resolution grid"

    def __init__(self, modalities: Mapping[str, int], num_classes: int, fusion: Any = None,
                 vision_encoder: Callable[..., nn.Module] | None = None, vision_pretrained: str | Path | None = None,
                 air: AirOptions | None = None,
                 film_stages: Annotated[Sequence[NonNegativeInt], Hint("fused stages with FiLM")] = (0, 1),
                 heads: Annotated[PositiveInt | None, Hint("null = channels // 64")] = None,
                 decoder: DecoderOptions | None = None,
                 aux_levels: Annotated[Sequence[PositiveInt], Hint("decoder levels 2.. with an aux head")] = (2, 3),
                 head_dropout: OpenFraction = 0.1, interleave: bool = True) -> None:
        super().__init__(modalities, num_classes)
        f = self.check_fusion(fusion, len(self.modalities))
        self.vision_name, self.air_name = list(self.modalities)
        factory = vision_encoder or _default_vision_encoder
        vis_kwargs: dict[str, Any] = {"in_chans": self.modalities[self.vision_name]}
        if vision_pretrained:
            vis_kwargs["pretrained"] = vision_pretrained
        vis = factory(**vis_kwargs)
        vis_channels, vis_reductions = list(vis.out_channels), list(vis.reductions)
        n = len(vis_channels)
        air_stream = self._air_stream(n, air)
        self.encoders = nn.ModuleDict({"vision": vis, "air": air_stream})
        film = {int(s) for s in film_stages}
        self.fused_stages = f.fused_stages(n, "the vision encoder's pyramid")
        levels = [int(a) for a in aux_levels]
        self._check_stages(n, film, levels)
        self.fusion = nn.ModuleDict({
            str(s): (FiLMGateFusion(vis_channels[s], air_stream.out_channels[s]) if s in film else
                     CrossAttentionFusion(vis_channels[s], air_stream.out_channels[s], heads=heads))
            for s in self.fused_stages})
        self.interleave = bool(interleave) and isinstance(getattr(vis, "stages", None), nn.ModuleList) \
            and len(vis.stages) == n and _runs_stages_in_sequence(vis)
        self.decoder = ASPPGatedDecoder(vis_channels, vis_reductions, **_given(decoder))
        self.head = SegmentationHead(self.decoder.out_channels, num_classes, head_dropout)
        self.aux_levels = levels
        self.aux_heads = nn.ModuleDict({
            f"f{a}": SegmentationHead(self.decoder.stage_channels[-a], num_classes, head_dropout) for a in levels})

    def _air_stream(self, n: int, air: Mapping[str, Any] | None) -> ConvNeXtStream:
        """The ConvNeXt stream, one stage per vision stage (`model.air` over the defaults for `n` stages)."""
        defaults = {"dims": (64, 128, 192, 256)[:n] + (256,) * max(0, n - 4), "depths": (2,) * n,
                    "strides": (1, 1) + (2,) * max(0, n - 2)}
        stream = ConvNeXtStream(self.modalities[self.air_name], **{**defaults, **_given(air)})
        if len(stream.out_channels) != n:
            raise ConfigError(f"model.air.dims has {len(stream.out_channels)} stages but the vision encoder "
                              f"has {n}; give the air stream one stage per vision stage.")
        return stream

    def _check_stages(self, n: int, film: set[int], aux_levels: list[int]) -> None:
        """FiLM only at fused stages, aux heads at decoder levels 2..n."""
        if unfused := sorted(film - set(self.fused_stages)):
            where = f"outside 0..{n - 1}" if any(not 0 <= s < n for s in unfused) else "not fused"
            raise ConfigError(f"model.film_stages={sorted(film)} names stage(s) {unfused} {where} (fused stages: "
                              f"{self.fused_stages}), where FiLM would never run; list fused stages, or [] for "
                              "cross-attention everywhere.")
        if any(not 2 <= a <= n for a in aux_levels):
            raise ConfigError(f"model.aux_levels={aux_levels} must lie in 2..{n} (level 1 is the main head).")

    @property
    def aux_outputs(self) -> dict[str, float | None]:
        """f2 0.3 and f3 0.15 by default; a deeper level (model.aux_levels) has no default weight."""
        return {f"f{a}": AUX_DEFAULT_WEIGHTS.get(f"f{a}") for a in self.aux_levels}

    @classmethod
    def fusion_stage_count(cls, config: Mapping[str, Any]) -> int | None:
        """One stage per air-stream stage (the model refuses any other count); MiT-B1's four by default."""
        dims = (config.get("air") or {}).get("dims")
        return len(dims) if dims is not None else (4 if config.get("vision_encoder") is None else None)

    # ------------------------------------------------------------------ forward

    def encode(self, image: torch.Tensor, air: torch.Tensor | None) -> list[torch.Tensor]:
        """The (fused) vision pyramid; `air=None` skips the air stream and every fusion module."""
        air_feats = self.encoders["air"](air) if air is not None else None
        vis = self.encoders["vision"]

        def fuse(s: int, x: torch.Tensor) -> torch.Tensor:
            if air_feats is None or s not in self.fused_stages:
                return x
            return self.fusion[str(s)](x, air_feats[s])

        if self.interleave:
            feats, x = [], image
            for s, stage in enumerate(vis.stages):
                x = fuse(s, stage(x))
                feats.append(x)
            return feats
        return [fuse(s, x) for s, x in enumerate(vis(image))]

    def decode(self, feats: Sequence[torch.Tensor], size: torch.Size) -> dict[str, torch.Tensor]:
        outs = self.decoder.forward_all(feats)
        logits = self.head(outs[-1])
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        result = {"out": logits}
        if self.training:
            for a in self.aux_levels:
                result[f"f{a}"] = self.aux_heads[f"f{a}"](outs[-a])
        return result

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        image = inputs[self.vision_name]
        return self.decode(self.encode(image, inputs[self.air_name]), image.shape[-2:])

    def forward_vision_only(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vision stream alone (no air stream, no fusion): the model's function at initialisation."""
        return self.decode(self.encode(image, None), image.shape[-2:])


def _runs_stages_in_sequence(encoder: nn.Module) -> bool:
    """True for encoders whose forward is `for stage in stages: x = stage(x); collect x` (MiT)."""
    try:
        from segplat.models.encoders.mit import MixVisionTransformer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(encoder, MixVisionTransformer)
