"""Any timm model as a pyramid encoder through `features_only`."""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from segplat.errors import ConfigError
from segplat.models.weights import load_adapted_state_dict

log = logging.getLogger(__name__)


class TimmEncoder(nn.Module):
    """Wraps `timm.create_model(name, features_only=True)`; weights come from a local file only.

    `pretrained` is a path to a timm/torch state dict (or None for random init): runs never download.
    `out_indices` picks pyramid levels; `output_stride` (8/16/32) dilates the last stages where timm
    supports it (DeepLabV3+).
    """

    def __init__(self, name: str, in_chans: int, pretrained: str | None = None,
                 out_indices: tuple[int, ...] | None = None, output_stride: int | None = None,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        kwargs = {"features_only": True, "pretrained": False, "in_chans": in_chans}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if output_stride is not None and output_stride != 32:
            kwargs["output_stride"] = output_stride
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        try:
            self.model = timm.create_model(name, **kwargs)
        except RuntimeError as err:
            raise ConfigError(f"model encoder name={name!r} is not a timm model with features_only support "
                              f"({err}); see timm.list_models().") from err
        if pretrained:
            self.load_pretrained(pretrained, in_chans)
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())

    def load_pretrained(self, path: str, in_chans: int) -> None:
        report = load_adapted_state_dict(self.model, path, in_chans)
        log.info("loaded %s into %s: %s", path, type(self.model).__name__, report)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))
