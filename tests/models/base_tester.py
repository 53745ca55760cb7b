"""One test suite for every model preset (the segmentation_models_pytorch way).

A model test module subclasses `ModelTester`, sets `build(modalities, num_classes)` and the
fusion levels to try, and inherits: output shape, backward pass, parameter-count range, aux
outputs, any channel count per modality, and the param-group split used by the optimiser.
Keep inputs tiny: the whole model suite must stay fast on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from segplat.errors import ConfigError
from segplat.models.base import PARAM_GROUPS, SegmentationModel
from segplat.schema import check_targets


def refusal(target: type, keys: Mapping[str, Any], build: Callable[[], Any] | None = None) -> str:
    """What a task says about `model: {_target_: target, **keys}`: the config walker's refusal (the keys' types), else
    the one `build()` raises (what the keys say together); fails when neither refuses."""
    with pytest.raises(ConfigError) as err:
        check_targets({"model": {"_target_": f"{target.__module__}.{target.__qualname__}", **keys}})
        if build is not None:
            build()
    return str(err.value)


class ModelTester:
    #: modality name -> channels, for the default build
    modalities: Mapping[str, int] = {"rgb": 3, "nir": 1}
    #: spatial size per modality (defaults to `size` for each)
    sizes: Mapping[str, tuple[int, ...]] = {}
    size: int = 64
    batch: int = 2
    num_classes: int = 4
    #: expected (min, max) parameters of the default build, to catch a wrong configuration (every tester sets it)
    param_range: tuple[int, int] | None = None
    #: output keys besides "out" the model must return in training mode
    aux_keys: tuple[str, ...] = ()
    #: fusion configs to run the shape/backward tests under (None = the model's default)
    fusions: tuple[dict | None, ...] = (None,)
    #: extra channel counts to try (replaces each modality's channels)
    other_channels: tuple[int, ...] = (1, 5)
    #: whether every param group must be non-empty (dual-stream fusion models have all three)
    require_groups: tuple[str, ...] = ("encoder", "decoder")

    def build(self, modalities: Mapping[str, int], num_classes: int, fusion: dict | None = None) -> SegmentationModel:
        raise NotImplementedError

    def inputs(self, modalities: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        mods = modalities or self.modalities
        out = {}
        for m, c in mods.items():
            shape = self.sizes.get(m, (self.size, self.size))
            out[m] = torch.randn(self.batch, c, *shape)
        return out

    def out_size(self) -> tuple[int, int]:
        first = next(iter(self.modalities))
        return tuple(self.sizes.get(first, (self.size, self.size)))[-2:]

    def _check_output(self, model: SegmentationModel, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(x)
        assert isinstance(out, dict) and "out" in out, "models return a dict with key 'out'"
        assert out["out"].shape == (self.batch, self.num_classes, *self.out_size())
        assert torch.isfinite(out["out"]).all()
        return out

    def test_forward_backward_each_fusion(self) -> None:
        torch.manual_seed(0)
        for fusion in self.fusions:
            model = self.build(self.modalities, self.num_classes, fusion)
            model.train()
            out = self._check_output(model, self.inputs())
            # exactly the outputs the model declares (the loss refuses weights for others before any data)
            assert sorted(k for k in out if k != "out") == sorted(self.aux_keys) == sorted(model.aux_outputs), \
                f"training outputs {sorted(out)} vs declared aux_outputs {sorted(model.aux_outputs)} (fusion {fusion})"
            loss = sum(v.float().mean() for v in out.values())
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient (fusion {fusion})"
            # a parameter outside the graph never trains, and DDP stops on it (find_unused_parameters=False)
            unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, f"{len(unused)} parameters get no gradient (fusion {fusion}): {unused[:5]}"

    def test_eval_mode_output(self) -> None:
        model = self.build(self.modalities, self.num_classes, self.fusions[0]).eval()
        with torch.no_grad():
            self._check_output(model, self.inputs())

    def test_parameter_count_in_range(self) -> None:
        model = self.build(self.modalities, self.num_classes, self.fusions[0])
        n = sum(p.numel() for p in model.parameters())
        assert self.param_range is not None, f"{type(self).__name__} must set param_range to the build's expected size"
        lo, hi = self.param_range
        assert lo <= n <= hi, f"{type(model).__name__} has {n} parameters, expected {lo}..{hi}"

    def test_any_channel_count(self) -> None:
        for c in self.other_channels:
            mods = {m: c for m in self.modalities}
            model = self.build(mods, self.num_classes, self.fusions[0]).eval()
            with torch.no_grad():
                out = model(self.inputs(mods))
            assert out["out"].shape[1] == self.num_classes

    def test_param_groups_cover_all_parameters(self) -> None:
        model = self.build(self.modalities, self.num_classes, self.fusions[0])
        groups = model.grouped_parameters()
        assert set(groups) == set(PARAM_GROUPS)
        total = sum(len(v) for v in groups.values())
        assert total == len(list(model.parameters()))
        for g in self.require_groups:
            assert groups[g], f"param group {g!r} is empty"
