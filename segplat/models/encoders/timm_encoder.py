"""Any timm model as a pyramid encoder through `features_only`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Literal

import timm
import torch
from torch import nn

from segplat.errors import ConfigError
from segplat.models.weights import load_adapted_state_dict, load_state_file
from segplat.schema import Hint, OpenFraction

log = logging.getLogger(__name__)


class TimmEncoder(nn.Module):
    """Wraps `timm.create_model(name, features_only=True)`; weights come from a local file only.

    `pretrained` is a path to a timm/torch state dict (or None for random init): runs never download.
    `out_indices` picks pyramid levels; `output_stride` (8/16/32) dilates the last stages where timm
    supports it (DeepLabV3+).
    """

    def __init__(self, name: Annotated[str, Hint("a timm model with features_only support")], in_chans: int,
                 pretrained: str | None = None,
                 out_indices: Annotated[Sequence[int] | None, Hint("pyramid levels; null = all")] = None,
                 output_stride: Annotated[Literal[8, 16, 32] | None, Hint("null = 32")] = None,
                 drop_path_rate: OpenFraction = 0.0) -> None:
        super().__init__()
        self.name = name
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
        """Load a timm state dict, or refuse one that leaves weights at random init: the load is non-strict (a
        classifier head and other input channels are expected), so a file of another architecture or with
        prefixed keys used to load nothing, or a few same-shaped tensors, with an INFO line only."""
        state = load_state_file(path)
        for prefix in ("module.", "model.", "encoder."):  # DDP / Lightning / segplat wrappers
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        report = load_adapted_state_dict(self.model, path, in_chans, state=state)
        missing = [k for k in report["missing"] if not k.endswith("num_batches_tracked")]
        total = sum(1 for k in self.model.state_dict() if not k.endswith("num_batches_tracked"))
        if missing or report["shape_mismatch"]:
            example = (missing or report["shape_mismatch"])[0]
            raise ConfigError(f"model encoder pretrained={path} does not fit the timm {self.name}: {len(missing)} of "
                              f"its {total} weights are not in the file and {len(report['shape_mismatch'])} have "
                              f"another shape (e.g. {example}), so they would train from random init; give the "
                              f"state dict of a timm {self.name}.")
        log.info("loaded %s into %s (%d weights; input conv adapted: %s; left out: %d, e.g. the classifier)", path,
                 self.name, total, report["adapted"] or "no", len(report["unexpected"]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))
