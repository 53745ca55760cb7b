"""FusionSpec: built from conf/fusion entries or plain mappings; every key takes effect or is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from segplat.config import check_config
from segplat.errors import ConfigError
from segplat.models.fusion import AttentionFusion, ConcatFusion, FusionSpec, resolve_fusion
from segplat.models.unet3d import UNet3D
from tests.conftest import TINY, compose_train
from tests.models.fusion_helpers import tiny_overrides
from tests.models.test_unet3d import series

MODEL = [o for o in TINY if o.startswith("model.")]


def test_entries_instantiate_to_specs_with_their_modules(tmp_path: Path) -> None:
    spec = instantiate(compose_train(["fusion=mid_attention"], tmp_path).fusion)
    assert (spec.level, spec.type, spec.stages) == ("mid", "attention", None)
    module = spec.build([8, 4], 16)
    assert isinstance(module, AttentionFusion) and module.channel[0].out_features == max(8, 32 // 4)


def test_a_module_argument_takes_effect(tmp_path: Path) -> None:
    cfg = compose_train([*MODEL, "fusion=mid_attention", "fusion.module.reduction=1"], tmp_path)
    check_config(cfg)
    model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=3)
    stage = model.fusion["4"]
    assert stage.channel[0].out_features == 2 * stage.out_channels  # reduction 1: no squeeze


def test_plain_mappings_take_the_module_of_their_type_from_the_config_group() -> None:
    """Models built in code and checkpoints written before specs pass {level, type, stages}."""
    spec = resolve_fusion({"level": "mid", "type": "attention", "stages": [2, 1, 2]})
    assert spec.stages == (1, 2) and spec.module is None
    assert isinstance(spec.with_module("Segmenter").build([4, 4], 8), AttentionFusion)
    assert isinstance(resolve_fusion({"level": "late"}).with_module("Segmenter").build([4, 4], 8), ConcatFusion)


def test_a_type_overridden_on_the_early_entry_takes_effect(tmp_path: Path) -> None:
    """The sweep's `fusion.level=mid fusion.type=attention` on top of the default fusion=early."""
    cfg = compose_train([*MODEL, "fusion.level=mid", "fusion.type=attention", "fusion.stages=[3,4]"], tmp_path)
    check_config(cfg)
    model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=3)
    assert sorted(model.fusion) == ["3", "4"] and all(isinstance(m, AttentionFusion) for m in model.fusion.values())


def test_a_type_that_contradicts_its_module_is_refused_with_the_entry_to_use(tmp_path: Path) -> None:
    cfg = compose_train([*MODEL, "fusion=mid", "fusion.type=attention"], tmp_path)
    with pytest.raises(ConfigError, match=r"fusion\.type=attention does not match .*fusion=mid_attention"):
        check_config(cfg)
    cfg = compose_train([*MODEL, "fusion=mid", "fusion.type=attention", "fusion.module=null"], tmp_path)
    check_config(cfg)  # ... or take the type's module
    model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=3)
    assert all(isinstance(m, AttentionFusion) for m in model.fusion.values())


@pytest.mark.parametrize("fusion, words", [
    ({"level": "early", "stages": [1]}, r"fusion\.stages=\[1\] picks stages of mid fusion only"),
    ({"level": "late", "stages": [1]}, r"fusion\.level=late has no per-stage fusion"),
    ({"level": "mid", "stages": []}, r"^fusion\.stages=\[\] must be a non-empty list of integers, 0 or more or null"),
    ({"level": "mid", "stages": ["a"]}, r"^fusion\.stages=\[a\] must be a non-empty list of integers"),
    ({"level": "mid", "stage": [1]}, r"^fusion\.stage is not a key of fusion; did you mean fusion\.stages\?$"),
    ({"level": "sideways"}, r"^fusion\.level=sideways is not known; use early, mid or late\.$"),
    ({"level": "mid", "type": ""}, r"^fusion\.type='' must be a non-empty string; a conf/fusion entry's type\.$"),
    ({"level": "mid", "module": {"_target_": "segplat.models.fusion.AttentionFusion", "_partial_": True,
                                 "reductoin": 2}},
     r"^fusion\.module\.reductoin is not a key of fusion\.module; did you mean fusion\.module\.reduction\?$"),
])
def test_malformed_specs_are_refused(fusion, words) -> None:
    with pytest.raises(ConfigError, match=words):
        resolve_fusion(fusion)


def test_module_arguments_at_early_fusion_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"fusion\.module\.reduction has no effect at fusion\.level=early"):
        resolve_fusion({"level": "early", "type": "attention",
                        "module": {"_target_": "segplat.models.fusion.AttentionFusion", "_partial_": True,
                                   "reduction": 2}})


def test_a_module_that_is_no_fusion_module_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"fusion\.module builds .* not a fusion module"):
        FusionSpec("mid", "concat", module=torch.nn.Identity)


def test_a_preset_that_would_ignore_the_fusion_group_is_refused(tmp_path: Path) -> None:
    cfg = compose_train([*MODEL, "fusion=mid"], tmp_path)
    with open_dict(cfg):
        cfg.model.fusion = {"level": "early", "type": "concat", "stages": None}  # an old-style inline fusion
    with pytest.raises(ConfigError, match=r"model\.fusion=.* differs from the fusion group"):
        check_config(cfg)
    with open_dict(cfg):
        del cfg.model.fusion
    with pytest.raises(ConfigError, match=r"takes no model\.fusion, so fusion=.* would be ignored"):
        check_config(cfg)


def test_fixed_fusion_presets_select_their_own_entry(tmp_path: Path) -> None:
    for preset, kind in (("cmx", "frm_ffm"), ("dualstream", "film_cross_attention"), ("ms2mnet", "wase_vfe")):
        cfg = compose_train(tiny_overrides(preset), tmp_path)
        assert OmegaConf.to_container(cfg.model.fusion) == OmegaConf.to_container(cfg.fusion)
        assert cfg.fusion.type == kind
        check_config(cfg)


def test_checkpoint_configs_without_a_target_still_build() -> None:
    """A run's saved config from before fusion specs: model.fusion is a plain mapping."""
    model_cfg = OmegaConf.create({
        "_target_": "segplat.models.Segmenter",
        "encoder": {"_target_": "segplat.models.encoders.TimmEncoder", "_partial_": True, "name": "resnet10t"},
        "decoder": {"_target_": "segplat.models.decoders.UNetDecoder", "_partial_": True, "channels": [16] * 4},
        "fusion": {"level": "mid", "type": "attention", "stages": [4]}})
    model = instantiate(model_cfg, modalities={"rgb": 3, "nir": 1}, num_classes=3)
    assert list(model.fusion) == ["4"] and isinstance(model.fusion["4"], AttentionFusion)


# -- UNet3D: the stages and the temporal cross-attention ----------------------------------------------------
def unet3d(fusion, **kwargs) -> UNet3D:
    return UNet3D({"s2": 4, "s1": 2}, 3, fusion=fusion, widths=(8, 16, 16), heads=2, **kwargs)


def test_unet3d_fuses_only_the_listed_levels() -> None:
    torch.manual_seed(0)
    model = unet3d({"level": "mid", "stages": [2]}).eval()
    assert sorted(model.fusion) == ["2", "x2_s1", "x2_s2"]  # cross-attention only where the streams fuse
    x = series({"s2": 4, "s1": 2}, size=8)
    y = {**x, "s1": x["s1"] + 1.0}
    for p in model.parameters():  # let the zero-initialised cross-attention pass S1 on
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(model(x)["out"], model(y)["out"], atol=1e-4)
    assert sorted(unet3d({"level": "mid"}, cross_attention=False).fusion) == ["0", "1", "2"]
    assert sorted(unet3d({"level": "mid", "stages": [0, 2]}).fusion) == ["0", "2", "x2_s1", "x2_s2"]


def test_unet3d_refuses_cross_attention_where_nothing_is_exchanged() -> None:
    with pytest.raises(ConfigError, match=r"model\.cross_attention=true .* fusion\.level=late"):
        unet3d({"level": "late"}, cross_attention=True)
    assert "x1_s1" not in unet3d({"level": "late"}).fusion  # null: off outside mid fusion
    with pytest.raises(ConfigError, match=r"attn_levels=\[\] and fusion\.stages=\[0, 1, 2\] share none"):
        unet3d({"level": "mid"}, cross_attention=True, attn_levels=[])
    assert not [k for k in unet3d({"level": "mid"}, attn_levels=[]).fusion if k.startswith("x")]  # null: quietly off


def test_unet3d_late_fusion_uses_the_named_module() -> None:
    assert isinstance(unet3d({"level": "late", "type": "attention"}).fusion["final"], AttentionFusion)
    assert isinstance(unet3d({"level": "late", "type": "concat"}).fusion["final"], ConcatFusion)


def test_a_module_of_another_type_points_to_the_entry_of_its_type():
    """The hint named the concat entries (fusion=early or late or mid) for an AttentionFusion module."""
    import functools

    from segplat.models.fusion import AttentionFusion

    with pytest.raises(ConfigError, match=r"builds AttentionFusion \(fusion type attention\); for type concat select "
                                          r"fusion=early or fusion=late or fusion=mid \(or set fusion\.module=null "
                                          r"to take its module\); for AttentionFusion select fusion=mid_attention\.$"):
        resolve_fusion({"level": "late", "type": "concat", "module": functools.partial(AttentionFusion)})
