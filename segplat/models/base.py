"""The contract every segplat model keeps.

- `__init__(modalities: dict[str, int], num_classes: int, ...)`: modality name -> input channels,
  in input order (the first is the primary stream: the output has its spatial size).
- `forward(inputs: dict[str, Tensor]) -> dict[str, Tensor]`: key "out" holds the main logits
  (B, num_classes, H, W) at the primary input's size; other keys are auxiliary logits at any
  size (the loss resizes them), named as the loss's `aux_weights` name them ("f2", "f3", ...).
- `param_group(name)` tells the optimiser whether a parameter belongs to the "encoder", the
  "fusion" or the "decoder" (decoder + heads), for separate learning rates and freezing.
- `supported_fusion` lists the fusion levels and types the model accepts; `check_fusion`
  refuses anything else before data is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from segplat.errors import ConfigError

PARAM_GROUPS = ("encoder", "fusion", "decoder")


def fusion_dict(fusion: Any) -> dict[str, Any]:
    """Accept a FusionSpec-like DictConfig/dict/None and return plain `{level, type, stages}`."""
    if fusion is None:
        return {"level": "early", "type": "concat", "stages": None}
    if hasattr(fusion, "items"):
        from omegaconf import DictConfig, OmegaConf

        d = OmegaConf.to_container(fusion, resolve=True) if isinstance(fusion, DictConfig) else dict(fusion)
    else:
        raise ConfigError(f"fusion must be a mapping with level/type/stages, got {fusion!r}.")
    d.setdefault("type", "concat")
    d.setdefault("stages", None)
    return d


class SegmentationModel(nn.Module):
    """Base class: modality bookkeeping, fusion checks and parameter grouping."""

    # level -> accepted types; models override
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...]]] = {"early": ("concat",)}
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

    @classmethod
    def check_fusion(cls, fusion: Any, num_modalities: int | None = None) -> dict[str, Any]:
        f = fusion_dict(fusion)
        level, kind = f["level"], f["type"]
        if level not in cls.supported_fusion:
            raise ConfigError(f"fusion.level={level} is not supported by {cls.__name__}; valid levels: "
                              f"{', '.join(cls.supported_fusion)}.")
        if kind not in cls.supported_fusion[level]:
            raise ConfigError(f"fusion.type={kind} is not supported by {cls.__name__} at level {level}; valid "
                              f"types: {', '.join(cls.supported_fusion[level])}.")
        if num_modalities == 1 and level != "early":
            raise ConfigError(f"fusion.level={level} needs at least two modalities but the dataset gives one; "
                              "use fusion=early or add a modality.")
        return f

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
