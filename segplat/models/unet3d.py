"""Temporal-attention 3-D U-Net for Sentinel-1/2 image time series (`model=unet3d`).

Inputs: `inputs[m]` is (B, T, C, H, W) for each temporal modality (a (B, C, H, W) modality is read
as a one-date series), with its pad mask `inputs[f"{m}_time_mask"]` (B, T), True = a real date;
optional `inputs[f"{m}_dates"]` (B, T) day offsets are used as attention positions when present
(else the date index). T may differ between modalities. Any other key is ignored.

Architecture (per stream):
- encoder level i: [spatial 2x max-pool] -> `SpatioTemporalBlock` (two t x 3 x 3 convolutions with
  per-date GroupNorm and a residual) -> at `attn_levels` a `TemporalAttention` block (per-pixel
  multi-head self-attention over the dates, padded keys masked out, + MLP). Time is never
  downsampled: a series is a handful to a few dozen dates, and pooling them would mix real and
  padded ones.
- skips: each level's (B, C, T, H, W) map is collapsed to (B, C, H, W) by masked attention pooling
  (`pool: attention`, L-TAE-style grouped scores, softmax over the real dates) or a masked mean
  (`pool: mean`); the deepest level (the bottleneck) is collapsed the same way.
- decoder: 2-D U-Net blocks (upsample, concatenate the collapsed skip, two 3x3 conv-BN-ReLU),
  because every skip is already a single map once its dates are pooled; a 1x1 head.

Padding never matters: the real dates are first moved to the front (`compact_time`), padded dates
are zeroed before every convolution and get zero weight in every attention and every pooling, and
no normalisation statistic spans dates. Appending padded dates with any values leaves the output
unchanged (tests/models/test_unet3d.py checks it for every fusion level).

Fusion (`fusion.level`, and the stage module the fusion entry names: concat, attention or any other
`StageFusion`), for several streams such as S2 + S1:
- early/concat: one encoder on the bands of all streams concatenated date by date. Streams have
  their own dates and lengths, so each stream's real dates are first resampled onto `early_steps`
  evenly spaced slots spanning its own observed period (linear interpolation between neighbouring
  real dates; padding is never read). Streams with paired dates and n == early_steps are thus
  concatenated unchanged; a single stream is used as it is, and single images stay one slot.
  This assumes each stream covers the same season, as S1/S2 stacks do.
- mid: one encoder per stream; at each level in `fusion.stages` (null = every level) the streams'
  collapsed maps are merged into the decoder skip by the fusion module (concat: 1x1 conv + BN + ReLU
  over the concatenation; attention: a softmax over the streams per channel and pixel); at other
  levels the first stream's map is the skip. With `cross_attention` (null = on at mid level), at each
  fused level of `attn_levels` every date of a stream also attends to the real dates of the other
  streams at the same pixel (temporal cross-attention, zero-initialised so training starts from
  independent streams); the exchanged maps feed each stream's next level.
- late: a full encoder + decoder per stream; the final maps are merged by the fusion module.
Streams whose spatial size differs from the primary's are resized to it at the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
from annotated_types import MinLen
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.base import SegmentationModel
from segplat.models.encoders.temporal import (
    SpatioTemporalBlock,
    TemporalAttention,
    TemporalCrossAttention,
    TemporalPool,
    compact_time,
    resample_time,
    safe_mask,
)
from segplat.models.fusion import FusionSpec
from segplat.models.layers import conv_bn_act
from segplat.schema import Hint, NonNegativeInt, OpenFraction, PositiveInt

Stream = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (B, C, T, H, W), mask (B, T), positions (B, T)


DEFAULT_EARLY_STEPS = 8  # date slots of early fusion when model.early_steps is null

Widths = Annotated[Sequence[PositiveInt], MinLen(2), Hint("channels per level: a skip and a bottleneck at least")]
AttnLevels = Annotated[Sequence[NonNegativeInt] | None, Hint("levels of model.widths; null = all but the first")]
TimeKernel = Annotated[PositiveInt, Hint("odd (1, 3, 5, ...) to keep dates aligned")]
Pooling = Annotated[Literal["attention", "mean"], Hint("the masked temporal collapse of the skips")]
EarlySteps = Annotated[PositiveInt | None, Hint(f"date slots of early fusion; null = {DEFAULT_EARLY_STEPS}")]


class TemporalEncoder(nn.Module):
    """One stream's 3-D encoder; `stage(i, ...)` runs one level so mid fusion can interleave streams."""

    def __init__(self, in_chans: int, widths: Sequence[int], attn_levels: Sequence[int], heads: int = 4,
                 time_kernel: int = 3, pool: str = "attention") -> None:
        super().__init__()
        self.widths = list(widths)
        chans = [in_chans, *self.widths[:-1]]
        self.blocks = nn.ModuleList(SpatioTemporalBlock(c, w, time_kernel) for c, w in zip(chans, self.widths))
        self.attn = nn.ModuleDict({str(i): TemporalAttention(self.widths[i], heads) for i in attn_levels})
        self.pools = nn.ModuleList(TemporalPool(w, pool) for w in self.widths)

    def stage(self, i: int, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if i > 0:
            x = F.max_pool3d(x, kernel_size=(1, 2, 2), stride=(1, 2, 2), ceil_mode=True)
        x = self.blocks[i](x, mask)
        if str(i) in self.attn:
            x = self.attn[str(i)](x, mask, positions)
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Collapsed skips, finest first: [(B, w_i, H_i, W_i) for each level]."""
        skips = []
        for i in range(len(self.blocks)):
            x = self.stage(i, x, mask, positions)
            skips.append(self.pools[i](x, mask))
        return skips


def conv_block_2d(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU (keys 0..5, as the block always had)."""
    return nn.Sequential(*conv_bn_act(in_channels, out_channels, 3), *conv_bn_act(out_channels, out_channels, 3))


class UNetDecoder2d(nn.Module):
    """From collapsed skips [finest, ..., bottleneck] to a (B, widths[0], H, W) map."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(conv_block_2d(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 1))
        self.out_channels = widths[0]

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for i in reversed(range(len(skips) - 1)):
            x = F.interpolate(x, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.blocks[i](torch.cat([x, skips[i]], dim=1))
        return x


class UNet3D(SegmentationModel):
    # mid and late: any fusion type with a per-stage module (concat, attention, ... as conf/fusion defines them)
    builds_stage_modules = True
    takes_time_series = True
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"early": ("concat",), "mid": None, "late": None}

    def __init__(self, modalities: Mapping[str, int], num_classes: int, fusion: Any = None,
                 widths: Widths = (16, 32, 64, 128), attn_levels: AttnLevels = None, heads: PositiveInt = 4,
                 time_kernel: TimeKernel = 3, pool: Pooling = "attention", early_steps: EarlySteps = None,
                 head_dropout: OpenFraction = 0.0, cross_attention: bool | None = None) -> None:
        super().__init__(modalities, num_classes)
        f = self.check_fusion(fusion, len(self.modalities))
        self.level = f.level
        self.widths = [int(w) for w in widths]
        n_levels = len(self.widths)
        levels = list(range(1, n_levels)) if attn_levels is None else [int(i) for i in attn_levels]
        self._check_together(self.level, self.widths, levels, heads, time_kernel, early_steps, cross_attention)
        self.attn_levels = levels
        self.early_steps = DEFAULT_EARLY_STEPS if early_steps is None else int(early_steps)
        names = list(self.modalities)
        enc = dict(widths=self.widths, attn_levels=levels, heads=heads, time_kernel=time_kernel, pool=pool)
        w0 = self.widths[0]
        if self.level == "early":
            self.encoders = nn.ModuleDict({"stack": TemporalEncoder(sum(self.modalities.values()), **enc)})
        else:
            self.encoders = nn.ModuleDict({m: TemporalEncoder(c, **enc) for m, c in self.modalities.items()})
        if self.level == "mid":
            self.fusion = self._mid_fusion(f, heads, cross_attention)
        if self.level == "late":
            self.decoders = nn.ModuleDict({m: UNetDecoder2d(self.widths) for m in names})
            self.fusion = nn.ModuleDict({"final": f.build([w0] * len(names), w0)})
        else:
            self.decoder = UNetDecoder2d(self.widths)
        self.head = nn.Sequential(nn.Dropout2d(head_dropout) if head_dropout else nn.Identity(),
                                  nn.Conv2d(w0, num_classes, 1))

    def _mid_fusion(self, f: FusionSpec, heads: int, cross_attention: bool | None) -> nn.ModuleDict:
        """The fusion module of each fused level and, where it also has attention, the streams' date exchange."""
        names = list(self.modalities)
        self.fused_stages = f.fused_stages(len(self.widths), "the levels of model.widths")
        modules: dict[str, nn.Module] = {str(i): f.build([self.widths[i]] * len(names), self.widths[i])
                                         for i in self.fused_stages}
        self.exchange_levels = [] if cross_attention is False else [
            i for i in self.attn_levels if i in self.fused_stages]
        if cross_attention and not self.exchange_levels:
            raise ConfigError(f"model.cross_attention=true exchanges dates at fused levels of model.attn_levels, "
                              f"but attn_levels={self.attn_levels} and fusion.stages={self.fused_stages} share none, "
                              "so it would do nothing; fuse one of those levels or set model.cross_attention=null.")
        for i in self.exchange_levels:
            for m in names:
                modules[f"x{i}_{m}"] = TemporalCrossAttention(self.widths[i], self.widths[i], heads)
        return nn.ModuleDict(modules)

    @staticmethod
    def _check_together(level: str, widths: list[int], levels: list[int], heads: int, time_kernel: int,
                        early_steps: int | None, cross_attention: bool | None) -> None:
        """What the keys' types cannot say alone: levels of model.widths, heads dividing them, fusion-level keys."""
        if cross_attention and level != "mid":
            raise ConfigError(f"model.cross_attention=true exchanges dates between the streams' encoders at mid "
                              f"fusion only, but fusion.level={level}; set it to null or use fusion=mid.")
        bad = [i for i in levels if not 0 <= i < len(widths)]
        if bad:
            raise ConfigError(f"model.attn_levels={levels} names levels outside 0..{len(widths) - 1}; "
                              "list levels of model.widths.")
        if time_kernel % 2 == 0:
            raise ConfigError(f"model.time_kernel={time_kernel} must be odd (1, 3, 5, ...) to keep dates aligned.")
        if early_steps is not None and level != "early":
            raise ConfigError(f"model.early_steps={early_steps} sets the date slots of early fusion, but "
                              f"fusion.level={level} keeps each stream's own dates; set it to null or use "
                              "fusion=early.")
        uneven = [widths[i] for i in levels if widths[i] % int(heads)]
        if uneven:
            raise ConfigError(f"model.heads={heads} must divide the width of every attention level (model.widths at "
                              f"model.attn_levels: {[widths[i] for i in levels]}; {uneven} do not); "
                              "choose a divisor of each of them.")

    @classmethod
    def fusion_stage_count(cls, config: Mapping[str, Any]) -> int:
        """`fusion.stages` picks levels of `model.widths`."""
        widths = config.get("widths")
        return len(widths) if widths is not None else 4

    # -- inputs ---------------------------------------------------------------------------------
    def _stream(self, inputs: Mapping[str, torch.Tensor], m: str, size: torch.Size) -> Stream:
        t = inputs[m]
        if t.dim() == 4:
            t = t[:, None]
        if t.dim() != 5:
            raise ConfigError(f"unet3d expects {m} as (B, T, C, H, W) or (B, C, H, W) but got shape "
                              f"{tuple(t.shape)}; check the dataset's {m} layout.")
        if t.shape[2] != self.modalities[m]:
            raise ConfigError(f"{m} has {t.shape[2]} bands but the model was built for {self.modalities[m]}; "
                              "check dataset.modalities against the checkpoint's.")
        x = t.transpose(1, 2)  # (B, C, T, H, W)
        mask = inputs.get(f"{m}_time_mask")
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
        mask = mask.to(device=x.device, dtype=torch.bool)
        if tuple(mask.shape) != (x.shape[0], x.shape[2]):
            raise ConfigError(f"{m}_time_mask has shape {tuple(mask.shape)} but {m} has (B, T) = "
                              f"{(x.shape[0], x.shape[2])}; the mask must mark each date of the series.")
        x, mask, positions = compact_time(x, safe_mask(mask), inputs.get(f"{m}_dates"))
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=(x.shape[2], *size), mode="trilinear", align_corners=False)
        return x, mask, positions

    # -- forward --------------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        names = list(self.modalities)
        first = inputs[names[0]]
        size = first.shape[-2:]
        streams = {m: self._stream(inputs, m, size) for m in names}
        if self.level == "early" and len(names) == 1:
            feats = self.decoder(self.encoders["stack"](*streams[names[0]]))
        elif self.level == "early":
            # single images (T == 1 everywhere) stay one slot; series go onto `early_steps` slots
            steps = 1 if all(s[0].shape[2] == 1 for s in streams.values()) else self.early_steps
            x = torch.cat([resample_time(s[0], s[1], steps) for s in streams.values()], dim=1)
            mask = torch.ones(x.shape[0], steps, dtype=torch.bool, device=x.device)
            positions = torch.arange(steps, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
            feats = self.decoder(self.encoders["stack"](x, mask, positions))
        elif self.level == "mid":
            feats = self.decoder(self._mid(streams))
        else:
            finals = [self.decoders[m](self.encoders[m](*streams[m])) for m in names]
            feats = self.fusion["final"](finals)
        logits = self.head(feats)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return {"out": logits}

    def _mid(self, streams: dict[str, Stream]) -> list[torch.Tensor]:
        names = list(streams)
        xs = {m: s[0] for m, s in streams.items()}
        masks = {m: s[1] for m, s in streams.items()}
        pos = {m: s[2] for m, s in streams.items()}
        skips = []
        for i in range(len(self.widths)):
            xs = {m: self.encoders[m].stage(i, xs[m], masks[m], pos[m]) for m in names}
            if i in self.exchange_levels:
                exchanged = {}
                for m in names:
                    others = [o for o in names if o != m]
                    exchanged[m] = self.fusion[f"x{i}_{m}"](
                        xs[m], masks[m], torch.cat([xs[o] for o in others], dim=2),
                        torch.cat([masks[o] for o in others], dim=1), pos[m],
                        torch.cat([pos[o] for o in others], dim=1))
                xs = exchanged
            if i in self.fused_stages:
                skips.append(self.fusion[str(i)]([self.encoders[m].pools[i](xs[m], masks[m]) for m in names]))
            else:
                skips.append(self.encoders[names[0]].pools[i](xs[names[0]], masks[names[0]]))
        return skips
