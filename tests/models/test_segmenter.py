"""The generic Segmenter (timm encoder + U-Net decoder) at every fusion level."""

from __future__ import annotations

import functools
from typing import ClassVar

import pytest
import torch

from segplat.errors import ConfigError
from segplat.models import Segmenter
from segplat.models.decoders import UNetDecoder
from segplat.models.encoders import TimmEncoder
from tests.models.base_tester import ModelTester, refusal


def build_segmenter(modalities, num_classes, fusion=None):
    return Segmenter(modalities, num_classes, functools.partial(TimmEncoder, name="resnet10t"),
                     functools.partial(UNetDecoder, channels=(32, 16, 16, 16)), fusion)


class TestSegmenter(ModelTester):
    fusions = ({"level": "early"}, {"level": "mid", "stages": [1, 4]}, {"level": "late"})
    param_range = (4_000_000, 6_000_000)  # resnet10t (~4.9M) + a small decoder, early fusion

    def build(self, modalities, num_classes, fusion=None):
        return build_segmenter(modalities, num_classes, fusion)


class TestSegmenterLowResStream(ModelTester):
    """A second stream at 1/4 of the primary resolution (a coarse grid under an image)."""

    modalities: ClassVar[dict[str, int]] = {"image": 4, "grid": 6}
    sizes: ClassVar[dict[str, tuple[int, int]]] = {"image": (64, 64), "grid": (16, 16)}
    fusions = ({"level": "mid"}, {"level": "early"}, {"level": "late"})
    other_channels = (2,)
    require_groups = ("encoder", "fusion", "decoder")
    param_range = (9_500_000, 12_000_000)  # two resnet10t streams (~4.9M each) + mid fusion + a small decoder

    def build(self, modalities, num_classes, fusion=None):
        return build_segmenter(modalities, num_classes, fusion or {"level": "mid"})


def test_mid_fusion_uses_both_streams():
    torch.manual_seed(0)
    model = build_segmenter({"rgb": 3, "nir": 1}, 4, {"level": "mid"}).eval()
    x = {"rgb": torch.randn(1, 3, 32, 32), "nir": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        a = model(x)["out"]
        b = model({**x, "nir": torch.randn(1, 1, 32, 32)})["out"]
    assert not torch.allclose(a, b), "changing the NIR stream must change the output under mid fusion"


@pytest.mark.parametrize("fusion, words", [
    ({"level": "late", "type": "attention"}, r"fusion\.type=attention.*valid"),
    ({"level": "sideways"}, r"^fusion\.level=sideways is not known; use early, mid or late\.$"),
])
def test_invalid_fusion_is_refused_naming_valid_ones(fusion, words):
    with pytest.raises(ConfigError, match=words):
        build_segmenter({"rgb": 3, "nir": 1}, 4, fusion)


def test_mid_fusion_needs_two_modalities():
    with pytest.raises(ConfigError, match="at least two modalities"):
        build_segmenter({"rgb": 3}, 4, {"level": "mid"})


def test_decoder_width_lists_longer_than_the_pyramid_are_refused():
    """The extra widths were cut off without a word (model.decoder.channels=[128,64,32,16,8,4] on resnet18)."""
    from segplat.models.decoders.aspp_gated import ASPPGatedDecoder

    enc, red = [16, 32, 64, 128], [4, 8, 16, 32]
    with pytest.raises(ConfigError, match=r"^model\.decoder\.channels=\[64, 32, 16, 8\] lists 4 block widths, but the "
                                          r"encoder's 4-level pyramid gives 3 decoder blocks; list at most 3"):
        UNetDecoder(enc, red, channels=[64, 32, 16, 8])
    assert [b.conv2[0].out_channels for b in UNetDecoder(enc, red, channels=[64, 32]).blocks] == [64, 32, 32]
    assert [b.conv2[0].out_channels for b in UNetDecoder(enc, red).blocks] == [256, 128, 64]
    with pytest.raises(ConfigError, match=r"^model\.decoder\.channels=\[64, 32, 16, 8\] lists 4 stage widths"):
        ASPPGatedDecoder(enc, red, channels=[64, 32, 16, 8])


def test_the_unet_presets_encoder_keys_can_be_set():
    """output_stride was documented in a comment only: the API refused it and a typo was a raw TypeError."""
    import segplat
    from segplat.utils.task import config_error_hint

    model = segplat.create_model("unet", {"rgb": 3}, 3, encoder={"name": "resnet10t", "output_stride": 16})
    assert model.encoders["stack"].reductions[-1] == 16
    assert "did you mean model.encoder.output_stride?" in config_error_hint("train", ["model.encoder.output_strid=8"])
    assert refusal(Segmenter, {"encoder": {"_target_": "segplat.models.encoders.TimmEncoder", "_partial_": True,
                                           "name": "resnet10t", "output_stride": 7}}) == (
        "model.encoder.output_stride=7 is not known; use 8, 16, 32 or null; null = 32.")

