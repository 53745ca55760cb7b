"""model=cmx: the shared model suite, FRM/FFM behaviour, two-modality rule, checkpoints, a short run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hydra.utils import instantiate

from segplat.config import check_config
from segplat.errors import ConfigError
from segplat.models.cmx import CMX
from segplat.models.convert.mit import to_nvlabs_state_dict
from segplat.models.encoders.mit import MIT_SETTINGS, mit_b0
from segplat.models.fusion.cmx import CrossAttention, FeatureFusionModule, FeatureRectifyModule
from segplat.models.weights import adapt_input_weight
from tests.conftest import TINY, compose_train
from tests.models.base_tester import ModelTester


def build_cmx(modalities, num_classes=4, fusion=None, **kw) -> CMX:
    return CMX(modalities, num_classes, backbone=kw.pop("backbone", "mit_b0"), fusion=fusion, **kw)


class TestCMX(ModelTester):
    modalities: ClassVar[dict[str, int]] = {"rgb": 3, "nir": 1}
    fusions = (None, {"level": "mid", "type": "frm_ffm", "stages": [1, 3]})
    # two MiT-B0 (6.6M) + FRM/FFM at 4 stages (4.2M) + the 512-wide MLP decoder (1.3M)
    param_range = (11_500_000, 12_700_000)
    require_groups = ("encoder", "fusion", "decoder")

    def build(self, modalities, num_classes, fusion=None):
        return build_cmx(modalities, num_classes, fusion)


def test_coarser_x_stream_is_resized_to_the_rgb_grid() -> None:
    model = build_cmx({"rgb": 3, "dsm": 2}, 3, decoder_embed_dim=None).eval()
    assert model.decoder.out_channels == 256  # null = SegFormer's width for B0
    with torch.no_grad():
        out = model({"rgb": torch.randn(1, 3, 64, 64), "dsm": torch.randn(1, 2, 32, 32)})["out"]
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(MIT_SETTINGS))
def test_every_variant_builds_its_own_configuration(name: str) -> None:
    with torch.device("meta"):
        model = CMX({"rgb": 3, "x": 3}, 40, backbone=name)
    dims, depths = MIT_SETTINGS[name]
    for enc in model.encoders:
        assert enc.out_channels == list(dims) and [len(s.blocks) for s in enc.stages] == list(depths)


def test_paper_size_of_cmx_b2() -> None:
    with torch.device("meta"):
        model = CMX({"rgb": 3, "depth": 3}, 40, backbone="mit_b2")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 66.6) < 0.1  # CMX paper, NYU Depth V2, MiT-B2


@pytest.mark.parametrize("mods", [{"rgb": 3}, {"rgb": 3, "nir": 1, "dsm": 1}])
def test_exactly_two_modalities(mods) -> None:
    with pytest.raises(ConfigError, match=r"exactly two modalities.*dataset\.modalities"):
        build_cmx(mods)


def test_other_fusion_types_are_refused_naming_the_valid_one() -> None:
    with pytest.raises(ConfigError, match="valid types: frm_ffm"):
        build_cmx({"rgb": 3, "nir": 1}, fusion={"level": "mid", "type": "concat"})
    with pytest.raises(ConfigError, match=r"fusion\.stages"):
        build_cmx({"rgb": 3, "nir": 1}, fusion={"level": "mid", "type": "frm_ffm", "stages": [4]})


def test_param_groups_split_streams_fusion_and_decoder() -> None:
    model = build_cmx({"rgb": 3, "nir": 1})
    groups = {g: {n for n, _ in ps} for g, ps in model.grouped_parameters().items()}
    assert all(n.startswith("encoders.") for n in groups["encoder"])
    assert any(n.startswith("encoders.1.") for n in groups["encoder"])
    assert all(n.startswith("fusion.") for n in groups["fusion"])
    assert {n.split(".")[1] for n in groups["fusion"]} == {"frm", "ffm"}
    assert all(n.startswith(("decoder.", "head.")) for n in groups["decoder"])


def test_frm_rectifies_each_stream_with_the_other() -> None:
    torch.manual_seed(0)
    frm = FeatureRectifyModule(8).eval()
    x1, x2 = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    o1, o2 = frm(x1, x2)
    cw, sw = frm.channel_weights(x1, x2), frm.spatial_weights(x1, x2)
    assert cw.shape == (2, 2, 8, 1, 1) and sw.shape == (2, 2, 1, 5, 6)
    torch.testing.assert_close(o1, x1 + 0.5 * cw[1] * x2 + 0.5 * sw[1] * x2)
    torch.testing.assert_close(o2, x2 + 0.5 * cw[0] * x1 + 0.5 * sw[0] * x1)
    # with an all-zero X stream the RGB stream passes unchanged (only the other stream is added)
    z1, _ = frm(x1, torch.zeros_like(x2))
    torch.testing.assert_close(z1, x1)


def test_ffm_context_is_softmax_over_key_channels_and_crosses_streams() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=2)
    ctx = attn._context(torch.randn(2, 30, 16), attn.kv1)
    assert ctx.shape == (2, 2, 8, 8)
    torch.testing.assert_close(ctx.sum(dim=-2), torch.ones(2, 2, 8))
    x1, x2 = torch.randn(2, 30, 16), torch.randn(2, 30, 16)
    y1, _ = attn(x1, x2)
    y1b, _ = attn(x1, torch.randn(2, 30, 16))
    assert not torch.allclose(y1, y1b), "stream 1 reads stream 2's context"
    ffm = FeatureFusionModule(16, heads=2).eval()
    out = ffm(torch.randn(2, 16, 5, 6), torch.randn(2, 16, 5, 6))
    assert out.shape == (2, 16, 5, 6)


def test_rectified_maps_feed_the_next_stage() -> None:
    torch.manual_seed(0)
    model = build_cmx({"rgb": 3, "nir": 1}).eval()
    seen = {}
    model.encoders[0].stages[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("rgb", args[0]))
    model.encoders[1].stages[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    x = {"rgb": torch.randn(1, 3, 64, 64), "nir": torch.randn(1, 1, 64, 64)}
    with torch.no_grad():
        model(x)
        r0, x0 = model.encoders[0].stages[0](x["rgb"]), model.encoders[1].stages[0](x["nir"])
        r1, x1 = model.fusion["frm"]["0"](r0, x0)
    torch.testing.assert_close(seen["rgb"], r1)
    torch.testing.assert_close(seen["x"], x1)
    assert not torch.allclose(seen["rgb"], r0)


def test_both_streams_load_one_segformer_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = mit_b0()
    nv = to_nvlabs_state_dict(src)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in nv.items()}}, tmp_path / "segformer_b0.pth")
    model = build_cmx({"rgb": 3, "nir": 1}, pretrained=str(tmp_path / "segformer_b0.pth"))
    rgb, x = model.encoders
    assert rgb.load_report["missing"] == [] and x.load_report["missing"] == []
    for key, value in src.state_dict().items():
        torch.testing.assert_close(rgb.state_dict()[key], value)
        if key != "stages.0.embed.proj.weight":
            torch.testing.assert_close(x.state_dict()[key], value)
    torch.testing.assert_close(x.stages[0].embed.proj.weight, adapt_input_weight(src.stages[0].embed.proj.weight, 1))


def test_preset_forces_its_own_fusion_and_checks_modalities(tmp_path: Path) -> None:
    cfg = compose_train(["model=cmx", "model.backbone=mit_b0"], output_dir=tmp_path)
    assert cfg.model.fusion.type == "frm_ffm" and cfg.model.backbone == "mit_b0"
    check_config(cfg)
    model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=4)
    assert isinstance(model, CMX)
    bad = compose_train(["model=cmx", "dataset.modalities=[rgb]"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"dataset\.modalities"):
        check_config(bad)


@pytest.mark.slow
def test_trains_a_few_steps_on_synthetic_data(tmp_path: Path) -> None:
    from segplat.train import train

    tiny = [o for o in TINY if not o.startswith("model.")]
    cfg = compose_train([*tiny, "model=cmx", "model.backbone=mit_b0", "model.decoder_embed_dim=64",
                         "trainer.max_epochs=1"], output_dir=tmp_path)
    score = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and 0.0 <= score <= 1.0
