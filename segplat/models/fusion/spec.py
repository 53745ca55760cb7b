"""The fusion spec: what a `conf/fusion/*.yaml` entry instantiates, and the one place stages are checked.

A `FusionSpec` holds `level` (early | mid | late), `type` (the name models, sweeps and messages use),
`stages` (which pyramid stages fuse at mid level; null = all) and `module`: a factory (a Hydra
`_partial_` of a `StageFusion` subclass, with that module's own arguments) that builds the fusion
module of one stage. Models build their fusion modules from it; none looks a type name up itself.

A model takes the spec as Hydra built it from the config, or a plain mapping `{level, type, stages}`
(a model built in code, a checkpoint written before specs existed, or `fusion.type=...` overridden on
top of `fusion=early`, whose entry has no module). A model that builds stage modules gives a spec
without one the module of the `conf/fusion` entry of its type (`with_module`): the config group is the
only place a type name is defined.

Fixed fusions (CMX's `frm_ffm`, DualStream's `film_cross_attention`, MS2MNet's `wase_vfe`) have
`module: null`: their model builds its own modules, and other models refuse them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from annotated_types import MinLen
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segplat.config import CONF_DIR
from segplat.errors import ConfigError
from segplat.schema import Hint, NonNegativeInt, check_targets
from segplat.utils.plain import to_plain

SPEC_TARGET = "segplat.models.fusion.FusionSpec"
Stages = Annotated[tuple[NonNegativeInt, ...], MinLen(1)] | None


class StageFusion(nn.Module):
    """The contract of a fusion module a config can name (`fusion.module`).

    `__init__(in_channels, out_channels, **own_args)`: one entry of `in_channels` per stream, in the
    model's modality order; `forward(feats) -> Tensor`: one map per stream (any spatial sizes) to one map
    of `out_channels` at the first stream's size. `fusion_type` is the `fusion.type` its config names.
    """

    fusion_type: ClassVar[str]

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ConfigError(f"fusion.type={self.fusion_type} fuses at least two streams but got {len(in_channels)}; "
                              "use fusion=early for one modality.")
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = int(out_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _module_class(module: Callable[..., nn.Module]) -> Any:
    return module.func if isinstance(module, functools.partial) else module


@dataclass(frozen=True)
class FusionSpec:
    """How a model fuses its streams (see the module docstring); the fields are typed for the config walker, and
    what they say together is checked on construction."""

    level: Literal["early", "mid", "late"] = "early"
    type: Annotated[str, MinLen(1), Hint("a conf/fusion entry's type")] = "concat"
    stages: Annotated[Stages, Hint("stage indices; null = every stage")] = None
    module: Callable[..., nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(sorted({int(s) for s in self.stages})))
        if self.stages is not None and self.level != "mid":
            raise ConfigError(f"fusion.stages={list(self.stages)} picks stages of mid fusion only, but fusion.level="
                              f"{self.level} has no per-stage fusion; set fusion.stages=null.")
        if self.module is not None:
            self._check_module()

    def _check_module(self) -> None:
        cls = _module_class(self.module)
        declared = getattr(cls, "fusion_type", None)
        if not (inspect.isclass(cls) and issubclass(cls, StageFusion) and declared):
            raise ConfigError(f"fusion.module builds {cls!r}, which is not a fusion module: subclass "
                              "segplat.models.fusion.StageFusion and set its fusion_type (see CONTRIBUTING.md).")
        if declared != self.type:
            def choose(kind: str) -> str:
                entries = entries_of_type(kind)
                return f"fusion={' or fusion='.join(entries)}" if entries else f"fusion.type={kind} with a module"

            hint = (f"for type {self.type} select {choose(self.type)} (or set fusion.module=null to take its "
                    f"module); for {cls.__name__} select {choose(declared)}")
            raise ConfigError(f"fusion.type={self.type} does not match fusion.module, which builds {cls.__name__} "
                              f"(fusion type {declared}); {hint}.")
        own = dict(self.module.keywords) if isinstance(self.module, functools.partial) else {}
        if self.level == "early" and own:
            raise ConfigError(f"fusion.module.{next(iter(own))} has no effect at fusion.level=early (the inputs are "
                              "stacked into one encoder, no fusion module is built); set fusion.module=null.")

    def with_module(self, model: str) -> FusionSpec:
        """This spec, its module taken from the conf/fusion entry of its type when none is given (for `model`)."""
        if self.module is not None or self.level == "early":
            return self
        return dataclasses.replace(self, module=module_of_type(self.type, f"{model}'s {self.level} fusion"))

    def build(self, in_channels: Sequence[int], out_channels: int) -> nn.Module:
        """One stage's fusion module: streams of `in_channels` -> `out_channels`."""
        if self.module is None:
            raise ConfigError(f"fusion.type={self.type} has no fusion module to build; choose a conf/fusion entry "
                              "with a module.")
        return self.module(list(in_channels), out_channels)

    def fused_stages(self, num_stages: int, pyramid: str) -> list[int]:
        """The stages to fuse in a pyramid of `num_stages` (null = all); any stage outside it is refused."""
        if self.stages is None:
            return list(range(num_stages))
        bad = [s for s in self.stages if not 0 <= s < num_stages]
        if bad:
            raise ConfigError(f"fusion.stages={list(self.stages)} names stage(s) {bad} outside 0..{num_stages - 1} "
                              f"of {pyramid}; list stages among those, or null for every stage.")
        last = num_stages - 1
        if self.level == "mid" and self.stages and last not in self.stages:
            # the second stream runs every stage up to the deepest fused one; past it nothing reads its features
            unused = f"{max(self.stages) + 1}..{last}" if max(self.stages) + 1 < last else str(last)
            raise ConfigError(f"fusion.stages={list(self.stages)} leaves stage(s) {unused} of {pyramid} in the "
                              f"second stream computed but never used (those weights never train, and DDP stops on "
                              f"them); "
                              f"include the last stage {last}, e.g. fusion.stages={sorted({*self.stages, last})}.")
        return list(self.stages)


def resolve_fusion(fusion: Any) -> FusionSpec | None:
    """A FusionSpec from a spec, a `_target_` config or a plain `{level, type, stages[, module]}` mapping."""
    if fusion is None or isinstance(fusion, FusionSpec):
        return fusion
    if not isinstance(fusion, Mapping | DictConfig):
        raise ConfigError(f"fusion must be a conf/fusion entry or a mapping of level/type/stages, got {fusion!r}.")
    if "_target_" in fusion:
        spec = _instantiate(fusion)
        if not isinstance(spec, FusionSpec):
            raise ConfigError(f"fusion._target_={fusion['_target_']} must build a segplat.models.fusion.FusionSpec.")
        return spec
    plain = dict(to_plain(fusion))
    check_targets({"_target_": SPEC_TARGET, **plain}, root="fusion")  # the walker, as for a conf/fusion entry
    if isinstance(plain.get("module"), Mapping):
        plain["module"] = _instantiate(plain["module"])
    return FusionSpec(**plain)


def _instantiate(config: Any) -> Any:
    """Hydra's instantiate, raising the ConfigError a target raised rather than Hydra's wrapper of it."""
    try:
        return instantiate(config)
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


@functools.lru_cache(maxsize=1)
def _group_entries() -> dict[str, tuple[str, Any]]:
    """conf/fusion's entries: option name -> (type, module config or None)."""
    entries = {}
    for path in sorted((CONF_DIR / "fusion").glob("*.yaml")):
        node = OmegaConf.load(path)
        entries[path.stem] = (str(node.get("type")), node.get("module"))
    return entries


def entries_of_type(type_name: str) -> list[str]:
    """The conf/fusion options of one fusion type (for messages)."""
    return [name for name, (kind, _) in _group_entries().items() if kind == type_name]


def stage_fusion_types() -> list[str]:
    """The fusion types of conf/fusion that have a per-stage module (for messages)."""
    return sorted({kind for kind, module in _group_entries().values() if module is not None})


def module_of_type(type_name: str, purpose: str) -> Callable[..., nn.Module] | None:
    """The module factory of the conf/fusion entries of `type_name`; None for a model's own (fixed) fusion."""
    modules = [module for kind, module in _group_entries().values() if kind == type_name]
    if not modules:
        known = sorted({kind for kind, _ in _group_entries().values()})
        raise ConfigError(f"fusion.type={type_name} is not a fusion type of conf/fusion, so {purpose} has no module "
                          f"to build (known types: {', '.join(known)}); pick one, or select the entry that defines it "
                          "(CONTRIBUTING.md, 'Adding a fusion type').")
    given = [m for m in modules if m is not None]
    return _instantiate(given[0]) if given else None
