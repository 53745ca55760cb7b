"""`build_model`: the one way the tasks build a model from its config and the dataset's facts, and the one place
the model contract is enforced (docs/user-project.md, "The model contract").

A model is either a `segplat.models.base.SegmentationModel` (what segplat's presets are: auxiliary outputs, mid
and late fusion, its own parameter groups) or a plain `torch.nn.Module` whose constructor takes `modalities`
(name -> channels) and `num_classes` and whose `forward(inputs: dict[str, Tensor])` returns logits (B, K, H, W)
or `{"out": logits}`. A plain module is wrapped in `PlainModel`, which gives it the documented defaults: no
auxiliary outputs (unless it has `aux_outputs`), parameter groups by name prefix (unless it has `param_group`),
early fusion only. A model missing part of the contract is refused before any data is read, in one sentence
naming the member and the page that documents it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from torch import nn

from segplat.errors import ConfigError, SegplatError
from segplat.messages import first_line
from segplat.models.base import PARAM_GROUPS, SegmentationModel
from segplat.models.fusion.spec import FusionSpec, resolve_fusion

MODEL_DOC = "docs/user-project.md, \"The model contract\""
# the keywords every model's constructor takes (the tasks pass them; `bands` only to models that take it)
REQUIRED_KEYWORDS = ("modalities", "num_classes")


def model_class(target: Any, key: str = "model._target_") -> type[nn.Module]:
    """The class a model config names, checked against the contract's class-level members before it is built."""
    try:
        obj = get_object(str(target))
    except Exception as err:
        raise ConfigError(f"{key}={target} cannot be imported ({first_line(err)}); install the package that "
                          "provides it or add its folder to PYTHONPATH.") from err
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ConfigError(f"{key}={target} is not a torch.nn.Module class; name the model class itself "
                          f"(see {MODEL_DOC}).")
    if issubclass(obj, SegmentationModel):
        return obj
    params = inspect.signature(obj.__init__).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    missing = [k for k in REQUIRED_KEYWORDS if k not in params and not takes_any]
    if missing:
        raise ConfigError(f"{key}={target}: its __init__ takes no {' or '.join(missing)} keyword, which every model "
                          f"gets (modalities: name -> input channels, num_classes: int; see {MODEL_DOC}).")
    if obj.forward is nn.Module.forward:
        raise ConfigError(f"{key}={target} defines no forward; a model maps dict[str, Tensor] (one entry per "
                          f"modality) to logits (B, num_classes, H, W) or {{'out': logits}} (see {MODEL_DOC}).")
    return obj


def fusion_check(model_cls: type) -> Callable[..., FusionSpec | None]:
    """`check_fusion` of a SegmentationModel; for a plain module, its one fusion: early (every modality in one
    dict), anything else refused (`segplat.config.check_model_fusion` calls this before data)."""
    own = getattr(model_cls, "check_fusion", None)
    if own is not None:
        return own

    def early_only(fusion: Any, num_modalities: int | None = None, num_stages: int | None = None) -> FusionSpec:
        spec = resolve_fusion(fusion) or FusionSpec()
        if (spec.level, spec.type) != ("early", "concat"):
            raise ConfigError(f"fusion={spec.level}/{spec.type} is not supported by {model_cls.__name__}, a plain "
                              "nn.Module, which takes early fusion only (every modality in one dict); use "
                              "fusion=early, or subclass segplat.models.base.SegmentationModel and declare "
                              f"supported_fusion (see {MODEL_DOC}).")
        return spec

    return early_only


class PlainModel(SegmentationModel):
    """A plain `nn.Module` under segplat's model contract: `net` is the user's module (parameter names and
    checkpoint keys gain the `net.` prefix); its output becomes `{"out": logits}`, checked on every call."""

    def __init__(self, net: nn.Module, modalities: Mapping[str, int], num_classes: int) -> None:
        super().__init__(modalities, num_classes)
        self.net = net

    @property
    def model_name(self) -> str:
        return f"{type(self.net).__module__}.{type(self.net).__qualname__}"

    @property
    def aux_outputs(self) -> dict[str, float | None]:
        return dict(getattr(self.net, "aux_outputs", None) or {})

    def param_group(self, name: str) -> str:
        inner = name.removeprefix("net.")
        own = getattr(self.net, "param_group", None)
        return own(inner) if own is not None else super().param_group(inner)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.net(inputs)
        if isinstance(out, torch.Tensor):
            out = {"out": out}
        elif not (isinstance(out, Mapping) and isinstance(out.get("out"), torch.Tensor)):
            raise ConfigError(f"{self.model_name}.forward returned {type(out).__name__}; it must return logits "
                              f"(B, num_classes, H, W) or a dict with them under 'out' (see {MODEL_DOC}).")
        logits = out["out"]
        size = tuple(inputs[self.primary].shape[-2:])
        if logits.ndim != 4 or logits.shape[1] != self.num_classes or tuple(logits.shape[-2:]) != size:
            raise ConfigError(f"{self.model_name}.forward returned logits of shape {tuple(logits.shape)}; they must be "
                              f"(B, {self.num_classes}, {size[0]}, {size[1]}): num_classes channels at the size of "
                              f"the first modality, {self.primary} (see {MODEL_DOC}).")
        return dict(out)


def check_members(net: nn.Module, target: str) -> None:
    """The optional members a plain module may define instead of the defaults, checked before data."""
    aux = getattr(net, "aux_outputs", None)
    if aux is not None and not (isinstance(aux, Mapping) and all(
            isinstance(k, str) and (v is None or (isinstance(v, int | float) and not isinstance(v, bool)))
            for k, v in aux.items())):
        raise ConfigError(f"{target}.aux_outputs is {aux!r}; it must map each auxiliary output forward returns to "
                          f"its default loss weight (or None), e.g. {{'aux': 0.4}} (see {MODEL_DOC}).")
    own = getattr(net, "param_group", None)
    if own is not None:
        for name, _ in net.named_parameters():
            group = own(name)
            if group not in PARAM_GROUPS:
                raise ConfigError(f"{target}.param_group({name!r}) returned {group!r}; it must return "
                                  f"{', '.join(PARAM_GROUPS[:-1])} or {PARAM_GROUPS[-1]} (see {MODEL_DOC}).")


def build_model(model_cfg: Any, modalities: Mapping[str, int], num_classes: int,
                bands: Mapping[str, Sequence[str]] | None = None) -> nn.Module:
    """`instantiate(model_cfg, modalities=..., num_classes=...)`; models that take a `bands` keyword (the generic
    Segmenter, for geo-foundation-model encoders that map band names onto their pretrained bands) also get the
    dataset's band names per modality. Other models never see the keyword. A plain module comes back wrapped in
    `PlainModel`."""
    target = str(model_cfg._target_)
    cls = model_class(target)
    kwargs: dict[str, Any] = {}
    if bands is not None and "bands" in inspect.signature(cls).parameters:
        kwargs["bands"] = {m: [str(b) for b in bands[m]] for m in modalities if m in bands}
    try:
        model = instantiate(model_cfg, modalities=dict(modalities), num_classes=num_classes, **kwargs)
    except InstantiationException as err:  # a model's own one-sentence refusal, not Hydra's wrapper around it
        if isinstance(err.__cause__, SegplatError):
            raise err.__cause__ from None
        raise
    if isinstance(model, SegmentationModel):
        return model
    check_members(model, target)
    return PlainModel(model, modalities, num_classes)
