"""`fusion.type=attention` for the generic Segmenter's mid level."""

from __future__ import annotations

import functools
from typing import ClassVar

import pytest
import torch
from hydra.utils import instantiate

from segplat.config import check_config
from segplat.errors import ConfigError
from segplat.models import Segmenter
from segplat.models.decoders import UNetDecoder
from segplat.models.encoders import TimmEncoder
from segplat.models.fusion.attention import AttentionFusion
from tests.conftest import compose_train
from tests.models.base_tester import ModelTester


def build(modalities, num_classes, fusion=None):
    return Segmenter(modalities, num_classes, functools.partial(TimmEncoder, name="resnet10t"),
                     functools.partial(UNetDecoder, channels=(16, 16, 16, 16)),
                     fusion or {"level": "mid", "type": "attention"})


class TestAttentionFusionSegmenter(ModelTester):
    modalities: ClassVar[dict[str, int]] = {"image": 4, "grid": 6}
    sizes: ClassVar[dict[str, tuple[int, int]]] = {"image": (32, 32), "grid": (8, 8)}
    size = 32
    fusions = ({"level": "mid", "type": "attention"}, {"level": "mid", "type": "attention", "stages": [0, 4]})
    other_channels = (2,)
    require_groups = ("encoder", "fusion", "decoder")
    param_range = (10_000_000, 13_000_000)  # two resnet10t streams (~4.9M each) + attention fusion + decoder

    def build(self, modalities, num_classes, fusion=None):
        return build(modalities, num_classes, fusion)


def test_weights_are_a_softmax_over_streams_uniform_at_init():
    torch.manual_seed(0)
    fusion = AttentionFusion([8, 4, 2], 16).eval()
    feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 4, 8, 8), torch.randn(2, 2, 16, 16)]
    w = fusion.stream_weights(feats)
    assert w.shape == (2, 3, 16, 16, 16)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 3))
    out = fusion(feats)
    assert out.shape == (2, 16, 16, 16)


def test_weights_learn_to_prefer_the_informative_stream():
    """Stream 1 is noise, stream 2 carries the target: a few steps move the weight towards stream 2."""
    torch.manual_seed(0)
    fusion = AttentionFusion([4, 4], 4)
    opt = torch.optim.Adam(fusion.parameters(), lr=0.02)
    for _ in range(40):
        signal = torch.randn(8, 4, 8, 8)
        out = fusion([torch.randn(8, 4, 8, 8), signal])
        loss = torch.nn.functional.mse_loss(out, signal.relu())
        opt.zero_grad()
        loss.backward()
        opt.step()
    fusion.eval()
    with torch.no_grad():
        w = fusion.stream_weights([torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)])
    assert w[:, 1].mean() > 0.6, f"weight on the informative stream is {w[:, 1].mean():.2f}"


def test_attention_fusion_uses_both_streams():
    torch.manual_seed(0)
    model = build({"rgb": 3, "nir": 1}, 4).eval()
    x = {"rgb": torch.randn(1, 3, 32, 32), "nir": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        a = model(x)["out"]
        b = model({**x, "nir": torch.randn(1, 1, 32, 32)})["out"]
    assert not torch.allclose(a, b)
    assert all(isinstance(m, AttentionFusion) for m in model.fusion.values())


def test_attention_only_at_mid_level():
    with pytest.raises(ConfigError, match=r"fusion\.type=attention.*valid types: concat"):
        build({"rgb": 3, "nir": 1}, 4, {"level": "late", "type": "attention"})


def test_fusion_preset_composes(tmp_path):
    cfg = compose_train(["fusion=mid_attention", "model.encoder.name=resnet10t",
                         "model.decoder.channels=[16,16,16,16]"], tmp_path)
    assert cfg.fusion.level == "mid" and cfg.fusion.type == "attention"
    check_config(cfg)
    model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=3)
    assert sorted(model.fusion) == ["0", "1", "2", "3", "4"]
