"""`build_model`: the one way the tasks build a model from its config and the dataset's facts."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from torch import nn

from segplat.errors import SegplatError


def build_model(model_cfg: Any, modalities: Mapping[str, int], num_classes: int,
                bands: Mapping[str, Sequence[str]] | None = None) -> nn.Module:
    """`instantiate(model_cfg, modalities=..., num_classes=...)`; models that take a `bands` keyword (the generic
    Segmenter, for geo-foundation-model encoders that map band names onto their pretrained bands) also get the
    dataset's band names per modality. Other models never see the keyword."""
    kwargs: dict[str, Any] = {}
    if bands is not None and "bands" in inspect.signature(get_object(model_cfg._target_)).parameters:
        kwargs["bands"] = {m: [str(b) for b in bands[m]] for m in modalities if m in bands}
    try:
        return instantiate(model_cfg, modalities=dict(modalities), num_classes=num_classes, **kwargs)
    except InstantiationException as err:  # a model's own one-sentence refusal, not Hydra's wrapper around it
        if isinstance(err.__cause__, SegplatError):
            raise err.__cause__ from None
        raise
