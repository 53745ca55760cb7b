"""model=segformer: the shared model suite, the paper's sizes, and the decoder against transformers'."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.nn import functional as F

import segplat
from segplat.config import check_config
from segplat.errors import ConfigError
from segplat.models.decoders.segformer_head import SegFormerHead
from segplat.models.segformer import SegFormer
from tests.conftest import compose_train
from tests.models.base_tester import ModelTester


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


def test_logits_match_transformers_with_the_same_weights(tmp_path: Path) -> None:
    """Encoder from a transformers checkpoint, decoder weights copied by hand: same logits as the reference."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=5)
    ref = transformers.SegformerForSemanticSegmentation(cfg).eval()
    for m in ref.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    ref.save_pretrained(tmp_path)
    ours = SegFormer({"rgb": 3}, 5, backbone="mit_b0", pretrained=str(tmp_path)).eval()
    head = ref.decode_head
    with torch.no_grad():
        for proj, mlp in zip(ours.decoder.proj, head.linear_projections):
            proj.weight.copy_(mlp.proj.weight[:, :, None, None])
            proj.bias.copy_(mlp.proj.bias)
        ours.decoder.fuse[0].weight.copy_(head.linear_fuse.weight)
        ours.decoder.fuse[1].load_state_dict(head.batch_norm.state_dict())
        ours.head[1].load_state_dict(head.classifier.state_dict())
        x = torch.randn(2, 3, 64, 64)
        expected = F.interpolate(ref(pixel_values=x).logits, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(ours({"rgb": x})["out"], expected, atol=1e-4, rtol=1e-4)


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
    with pytest.raises(ConfigError, match="backbone='resnet50' is not a MiT variant"):
        SegFormer({"rgb": 3}, 4, backbone="resnet50")


def test_preset_composes_and_builds(tmp_path: Path) -> None:
    cfg = compose_train(["model=segformer", "model.backbone=mit_b0"], output_dir=tmp_path)
    check_config(cfg)
    assert cfg.model.decoder_embed_dim is None and cfg.model.fusion.level == "early"
    model = segplat.create_model("segformer", {"rgb": 3, "nir": 1}, 4, backbone="mit_b0")
    assert isinstance(model, SegFormer) and model.decoder.out_channels == 256
