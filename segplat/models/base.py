"""The contract every segplat model keeps.

- `__init__(modalities: dict[str, int], num_classes: int, ...)`: modality name -> input channels,
  in input order (the first is the primary stream: the output has its spatial size).
- `forward(inputs: dict[str, Tensor]) -> dict[str, Tensor]`: key "out" holds the main logits
  (B, num_classes, H, W) at the primary input's size; other keys are auxiliary logits at any
  size (the loss resizes them), named as the loss's `aux_weights` name them ("f2", "f3", ...) and listed with
  their default weights in `aux_outputs`, so that a weight for an output the model lacks is refused before data.
- `param_group(name)` tells the optimiser whether a parameter belongs to the "encoder", the
  "fusion" or the "decoder" (decoder + heads), for separate learning rates and freezing.
- `supported_fusion` lists the fusion levels and types the model accepts (None: any type with a per-stage
  module, `segplat.models.fusion.StageFusion`); `check_fusion` refuses anything else before data is read,
  in one sentence naming the key, the model and what it accepts. A model with a fixed fusion (CMX, ...)
  sets `default_fusion` and describes it in `fixed_fusion`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from segplat.errors import ConfigError
from segplat.models.fusion.spec import FusionSpec, resolve_fusion, stage_fusion_types

PARAM_GROUPS = ("encoder", "fusion", "decoder")


class SegmentationModel(nn.Module):
    """Base class: modality bookkeeping, fusion checks and parameter grouping."""

    # level -> accepted fusion types; None = any type with a per-stage module (a StageFusion)
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"early": ("concat",)}
    # the fusion when none is given; a model with a fixed fusion names it here ...
    default_fusion: ClassVar[FusionSpec] = FusionSpec()
    # ... and says in a few words what it is (messages print it); None = the fusion group chooses
    fixed_fusion: ClassVar[str | None] = None
    # True: the model builds its fusion from `fusion.module` (a spec without one takes its type's, see FusionSpec)
    builds_stage_modules: ClassVar[bool] = False
    # False: the model fuses every stage and refuses a fusion.stages subset
    fusion_stages_selectable: ClassVar[bool] = True
    # set: the model takes exactly two modalities, in this order (e.g. "RGB stream first, X stream second")
    stream_roles: ClassVar[str | None] = None
    # True: the model takes time series ((B, T, C, H, W) with `<m>_time_mask` / `<m>_dates`); others are refused on
    # a temporal modality before any data is read (segplat.rules.check_model_inputs)
    takes_time_series: ClassVar[bool] = False
    # first attribute name in a parameter path -> group; anything else is "decoder"
    encoder_prefixes: ClassVar[tuple[str, ...]] = ("encoder", "encoders")
    fusion_prefixes: ClassVar[tuple[str, ...]] = ("fusion", "fusions")

    def __init__(self, modalities: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        if not modalities:
            raise ConfigError("the model needs at least one input modality; check dataset.modalities.")
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: a segmentation model needs at least 2 classes.")
        self.modalities = dict(modalities)
        self.num_classes = int(num_classes)

    @property
    def primary(self) -> str:
        return next(iter(self.modalities))

    @property
    def aux_outputs(self) -> dict[str, float | None]:
        """The auxiliary outputs `forward` returns in training (beside "out"), each with the weight the loss gives
        it unless `loss.aux_weights` says otherwise (None: no default, the loss must name it). None here."""
        return {}

    @classmethod
    def check_fusion(cls, fusion: Any, num_modalities: int | None = None,
                     num_stages: int | None = None) -> FusionSpec:
        """The FusionSpec this model builds from `fusion` (None = `default_fusion`), or a one-sentence refusal.

        `num_modalities` and `num_stages` (the model's pyramid depth) are checked when known.
        """
        spec = resolve_fusion(fusion) or cls.default_fusion
        name = cls.__name__
        default = cls.default_fusion
        fixed = (f" ({name}'s fusion is fixed: {default.level}/{default.type}, {cls.fixed_fusion}; "
                 f"{'only fusion.stages may vary' if cls.fusion_stages_selectable else 'nothing in it may vary'})"
                 if cls.fixed_fusion else "")
        if spec.level not in cls.supported_fusion:
            raise ConfigError(f"fusion.level={spec.level} is not supported by {name}; valid levels: "
                              f"{', '.join(cls.supported_fusion)}{fixed}.")
        types = cls.supported_fusion[spec.level]
        if types is not None and spec.type not in types:
            raise ConfigError(f"fusion.type={spec.type} is not supported by {name} at level {spec.level}; valid "
                              f"types: {', '.join(types)}{fixed}.")
        if cls.builds_stage_modules:
            spec = spec.with_module(name)
        if types is None and spec.module is None:
            raise ConfigError(f"fusion.type={spec.type} is not supported by {name} at level {spec.level}: it is a "
                              f"model's own fusion with no per-stage module; valid types: "
                              f"{', '.join(stage_fusion_types())} (any conf/fusion entry with a module).")
        if spec.stages is not None and not cls.fusion_stages_selectable:
            raise ConfigError(f"fusion.stages={list(spec.stages)} is not supported by {name}, which fuses every "
                              f"stage; set fusion.stages=null{fixed}.")
        if num_stages is not None:
            spec.fused_stages(num_stages, f"{name}'s pyramid")
        if cls.stream_roles and num_modalities is not None and num_modalities != 2:
            raise ConfigError(f"{name} fuses exactly two modalities ({cls.stream_roles}) but dataset.modalities "
                              f"gives {num_modalities}; list two in dataset.modalities.")
        if num_modalities == 1 and spec.level != "early":
            raise ConfigError(f"fusion.level={spec.level} needs at least two modalities but the dataset gives one; "
                              "use fusion=early or add a modality.")
        return spec

    @classmethod
    def fusion_stage_count(cls, config: Mapping[str, Any]) -> int | None:
        """The number of pyramid stages `fusion.stages` picks from, known from the model config alone
        (None: only known once built); lets `segplat.config.check_config` refuse a bad stage before data."""
        return None

    def param_group(self, name: str) -> str:
        head = name.split(".", 1)[0]
        if head in self.encoder_prefixes:
            return "encoder"
        if head in self.fusion_prefixes:
            return "fusion"
        return "decoder"

    def grouped_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in PARAM_GROUPS}
        for name, p in self.named_parameters():
            groups[self.param_group(name)].append((name, p))
        return groups

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ConfigError(f"the model expects modalities {list(self.modalities)} but the batch lacks {missing}; "
                              "check dataset.modalities against the checkpoint's.")
