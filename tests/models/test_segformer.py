"""model=segformer: the shared model suite, the paper's sizes, and the decoder against transformers'."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.nn import functional as F

import segplat
from segplat.config import check_config
from segplat.errors import CheckpointError, ConfigError
from segplat.models.decoders.segformer_head import SegFormerHead
from segplat.models.encoders.mit import MIT_SETTINGS
from segplat.models.segformer import SegFormer
from tests.conftest import compose_train
from tests.models.base_tester import ModelTester, refusal


class TestSegFormer(ModelTester):
    modalities: ClassVar[dict[str, int]] = {"rgb": 3, "nir": 1}
    # MiT-B0 (3.32M, 4 input channels) + the 256-wide MLP decoder (0.43M) + a 4-class classifier
    param_range = (3_600_000, 3_800_000)

    def build(self, modalities, num_classes, fusion=None):
        return SegFormer(modalities, num_classes, backbone="mit_b0", fusion=fusion)


def test_coarser_stream_is_upsampled_before_the_concat() -> None:
    model = SegFormer({"image": 3, "grid": 5}, 3, backbone="mit_b0").eval()
    assert model.encoder.in_chans == 8
    with torch.no_grad():
        out = model({"image": torch.randn(1, 3, 64, 64), "grid": torch.randn(1, 5, 16, 16)})["out"]
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("backbone, width", [("mit_b0", 256), ("mit_b1", 256), ("mit_b2", 768), ("mit_b5", 768)])
def test_decoder_width_follows_the_variant(backbone: str, width: int) -> None:
    with torch.device("meta"):
        model = SegFormer({"rgb": 3}, 5, backbone=backbone)
    assert model.decoder.out_channels == width
    with torch.device("meta"):
        assert SegFormer({"rgb": 3}, 5, backbone=backbone, decoder_embed_dim=64).decoder.out_channels == 64


def test_sizes_match_transformers_semantic_segmentation() -> None:
    transformers = pytest.importorskip("transformers")
    for name, dims, depths, width in [("mit_b0", [32, 64, 160, 256], [2, 2, 2, 2], 256),
                                      ("mit_b2", [64, 128, 320, 512], [3, 4, 6, 3], 768)]:
        cfg = transformers.SegformerConfig(hidden_sizes=dims, depths=depths, decoder_hidden_size=width, num_labels=150)
        with torch.device("meta"):
            ours = SegFormer({"rgb": 3}, 150, backbone=name)
            ref = transformers.SegformerForSemanticSegmentation(cfg)
        n = sum(p.numel() for p in ours.parameters())
        assert n == sum(p.numel() for p in ref.parameters())
    # the paper's SegFormer-B2 on ADE20K: 27.5M (encoder 24.2 + decoder 3.3)
    assert abs(n / 1e6 - 27.5) < 0.1


def _reference(name: str, num_labels: int = 5):
    """A transformers SegformerForSemanticSegmentation with random weights everywhere, BatchNorm included."""
    transformers = pytest.importorskip("transformers")
    dims, depths = MIT_SETTINGS[name]
    cfg = transformers.SegformerConfig(hidden_sizes=list(dims), depths=list(depths), num_labels=num_labels,
                                       decoder_hidden_size=256 if name in ("mit_b0", "mit_b1") else 768)
    ref = transformers.SegformerForSemanticSegmentation(cfg).eval()
    with torch.no_grad():
        for m in ref.decode_head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(std=0.1)
    return ref


def _reference_logits(ref, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.interpolate(ref(pixel_values=x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", ["mit_b0", pytest.param("mit_b2", marks=pytest.mark.slow)])
def test_save_pretrained_loads_encoder_and_head_to_the_reference_logits(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = _reference(name)
    ref.save_pretrained(tmp_path)
    ours = SegFormer({"rgb": 3}, 5, backbone=name, pretrained=str(tmp_path)).eval()
    assert ours.head_report == {"loaded": True, "classifier": True, "missing": []}
    assert ours.encoder.load_report["missing"] == [] and ours.encoder.load_report["unexpected"] == []
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = ours({"rgb": x})["out"]
    torch.testing.assert_close(out, _reference_logits(ref, x), atol=1e-5, rtol=1e-5)


def test_nvlabs_names_load_to_the_same_logits(tmp_path: Path) -> None:
    """The same weights under the NVlabs/mmseg 0.x names (encoder and `linear_c{i}`/`linear_fuse.conv`/`.bn`/
    `linear_pred` head), as an mmseg `state_dict` checkpoint."""
    from segplat.models.convert.mit import to_nvlabs_state_dict

    torch.manual_seed(1)
    ref = _reference("mit_b0")
    ref.save_pretrained(tmp_path / "hf")
    encoder = SegFormer({"rgb": 3}, 5, backbone="mit_b0", pretrained=str(tmp_path / "hf")).encoder
    head = ref.decode_head
    state = {f"backbone.{k}": v for k, v in to_nvlabs_state_dict(encoder).items()}
    for i, mlp in enumerate(head.linear_projections):
        state[f"decode_head.linear_c{i + 1}.proj.weight"] = mlp.proj.weight
        state[f"decode_head.linear_c{i + 1}.proj.bias"] = mlp.proj.bias
    state["decode_head.linear_fuse.conv.weight"] = head.linear_fuse.weight
    state.update({f"decode_head.linear_fuse.bn.{k}": v for k, v in head.batch_norm.state_dict().items()})
    state.update({f"decode_head.linear_pred.{k}": v for k, v in head.classifier.state_dict().items()})
    torch.save({"state_dict": state, "meta": {"mmseg_version": "0.11.0"}}, tmp_path / "segformer.b0.pth")
    ours = SegFormer({"rgb": 3}, 5, backbone="mit_b0", pretrained=str(tmp_path / "segformer.b0.pth")).eval()
    ours.encoder.set_block_norm_eps(1e-5)  # these weights were made under transformers' eps
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = ours({"rgb": x})["out"]
    torch.testing.assert_close(out, _reference_logits(ref, x), atol=1e-5, rtol=1e-5)


def test_other_class_count_keeps_all_but_the_classifier(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    ref = _reference("mit_b0", num_labels=150)
    ref.save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="segplat.models.convert.segformer_head"):
        ours = SegFormer({"rgb": 3}, 6, backbone="mit_b0", pretrained=str(tmp_path))
    assert ours.head_report["loaded"] and not ours.head_report["classifier"]
    lines = [r.getMessage() for r in caplog.records if "classifier" in r.getMessage()]
    assert len(lines) == 1 and "150 classes" in lines[0] and "predicts 6" in lines[0]
    torch.testing.assert_close(ours.decoder.fuse[0].weight, ref.decode_head.linear_fuse.weight)
    torch.testing.assert_close(ours.decoder.fuse[1].running_var, ref.decode_head.batch_norm.running_var)
    last_proj = ref.decode_head.linear_projections[3].proj.weight
    torch.testing.assert_close(ours.decoder.proj[3].weight[:, :, 0, 0], last_proj)
    assert ours.head[1].weight.shape[0] == 6


def test_a_head_of_another_width_is_refused_naming_the_key(tmp_path: Path) -> None:
    torch.manual_seed(3)
    _reference("mit_b0").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"256 wide: set model\.decoder_embed_dim=256"):
        SegFormer({"rgb": 3}, 5, backbone="mit_b0", pretrained=str(tmp_path), decoder_embed_dim=128)


def test_an_encoder_only_checkpoint_leaves_the_head_at_its_initialisation(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.SegformerModel(transformers.SegformerConfig()).save_pretrained(tmp_path)
    ours = SegFormer({"rgb": 3}, 5, backbone="mit_b0", pretrained=str(tmp_path))
    assert ours.head_report == {"loaded": False, "classifier": False, "missing": []}


def test_head_upsamples_every_stage_to_the_finest() -> None:
    head = SegFormerHead([8, 16, 24, 32], [4, 8, 16, 32], embed_dim=12).eval()
    feats = [torch.randn(1, c, 16 // 2**i, 20 // 2**i) for i, c in enumerate([8, 16, 24, 32])]
    out = head(feats)
    assert out.shape == (1, 12, 16, 20) and head.output_stride == 4
    with torch.no_grad():  # the coarsest stage reaches the output
        feats[3] = torch.randn_like(feats[3])
        assert not torch.allclose(head(feats), out)


def test_only_early_fusion_is_accepted() -> None:
    with pytest.raises(ConfigError, match="valid levels: early"):
        SegFormer({"rgb": 3, "nir": 1}, 4, fusion={"level": "mid"})


def test_unknown_backbone_is_refused() -> None:
    assert refusal(SegFormer, {"backbone": "resnet50"}) == ("model.backbone=resnet50 is not known; use mit_b0, mit_b1, "
                                                            "mit_b2, mit_b3, mit_b4 or mit_b5.")
    assert refusal(SegFormer, {"decoder_embed_dim": 0}).startswith("model.decoder_embed_dim=0 must be a positive "
                                                                   "integer or null; null = the paper's width")


def test_preset_composes_and_builds(tmp_path: Path) -> None:
    cfg = compose_train(["model=segformer", "model.backbone=mit_b0"], output_dir=tmp_path)
    check_config(cfg)
    assert cfg.model.decoder_embed_dim is None and cfg.model.fusion.level == "early"
    model = segplat.create_model("segformer", {"rgb": 3, "nir": 1}, 4, backbone="mit_b0")
    assert isinstance(model, SegFormer) and model.decoder.out_channels == 256
