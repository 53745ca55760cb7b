"""DeepLabV3+ as a decoder of the generic Segmenter on a dilated (output stride 16) timm encoder."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

import segplat
from segplat.errors import ConfigError
from segplat.models import Segmenter
from segplat.models.decoders import UNetDecoder
from segplat.models.decoders.aspp_gated import ASPP
from segplat.models.decoders.deeplabv3plus import DeepLabV3PlusDecoder
from segplat.models.encoders import TimmEncoder
from tests.conftest import compose_train
from tests.models.base_tester import ModelTester

ENCODER = functools.partial(TimmEncoder, name="resnet10t", output_stride=16)


def build_deeplab(modalities, num_classes, fusion=None, channels=32):
    return Segmenter(modalities, num_classes, ENCODER,
                     functools.partial(DeepLabV3PlusDecoder, channels=channels), fusion)


class TestDeepLabV3Plus(ModelTester):
    fusions = ({"level": "early"}, {"level": "mid"}, {"level": "mid", "type": "attention", "stages": [1, 4]},
               {"level": "late"})
    param_range = (4_900_000, 5_600_000)  # resnet10t (~4.9M) + ASPP/decoder at width 32 (early fusion)

    def build(self, modalities, num_classes, fusion=None):
        return build_deeplab(modalities, num_classes, fusion or {"level": "early"})


def test_output_stride_16_pyramid_and_stride_4_decoder():
    enc = ENCODER(in_chans=3)
    assert enc.reductions == [2, 4, 8, 16, 16]
    feats = enc(torch.randn(1, 3, 64, 64))
    assert feats[-1].shape[-1] == 4, "the last stage is dilated, not strided"
    dec = DeepLabV3PlusDecoder(enc.out_channels, enc.reductions, channels=16).eval()
    assert dec.low_index == 1 and dec.output_stride == 4
    assert dec.low_project[0].out_channels == 48
    with torch.no_grad():
        assert dec(feats).shape == (1, 16, 16, 16)


def test_aspp_branches_and_image_pooling_at_batch_one():
    aspp = ASPP(8, 16, rates=(12, 24, 36)).train()
    assert len(aspp.branches) == 4  # 1x1 + three atrous
    assert [b[0].dilation for b in aspp.branches[1:]] == [(12, 12), (24, 24), (36, 36)]
    out = aspp(torch.randn(1, 8, 5, 5))  # one sample per device in training must not break the pooling branch
    assert out.shape == (1, 16, 5, 5)
    aspp.eval()
    x = torch.randn(1, 8, 32, 32)
    y = x.clone()
    y[..., 0, 0] += 10.0  # far corner: only image pooling (and the widest rate) see it from the centre
    with torch.no_grad():
        assert not torch.allclose(aspp(x)[..., 16, 16], aspp(y)[..., 16, 16])


@pytest.mark.parametrize("fusion", [{"level": "early"}, {"level": "mid"}])
def test_unet_decoder_on_a_dilated_pyramid(fusion):
    """The U-Net decoder and the Segmenter cope with the repeated stride of an output-stride-16 encoder."""
    model = Segmenter({"rgb": 3, "nir": 1}, 3, ENCODER, functools.partial(UNetDecoder, channels=(16, 16, 16, 16)),
                      fusion).eval()
    with torch.no_grad():
        out = model({"rgb": torch.randn(1, 3, 64, 64), "nir": torch.randn(1, 1, 64, 64)})["out"]
    assert out.shape == (1, 3, 64, 64)


def test_low_level_stride_must_exist():
    with pytest.raises(ConfigError, match=r"model\.decoder\.low_level_stride=8"):
        DeepLabV3PlusDecoder([16, 32, 64], [4, 16, 16], low_level_stride=8)


@pytest.mark.parametrize("fusion", ["early", "mid"])
def test_preset_composes_and_trains_a_step(tmp_path, fusion):
    cfg = compose_train(["model=deeplabv3plus", f"fusion={fusion}", "model.encoder.name=resnet10t",
                         "model.decoder.channels=16"], tmp_path)
    assert cfg.model.encoder.output_stride == 16 and list(cfg.model.decoder.rates) == [12, 24, 36]
    model = segplat.create_model("deeplabv3plus", {"rgb": 3, "nir": 1}, 4, fusion=fusion,
                                 encoder={"name": "resnet10t"}, decoder={"channels": 16}).train()
    assert model.level == fusion and isinstance(model.decoder, DeepLabV3PlusDecoder)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model({"rgb": torch.randn(2, 3, 32, 32), "nir": torch.randn(2, 1, 32, 32)})["out"]
    assert out.shape == (2, 4, 32, 32)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 4, (2, 32, 32))).backward()
    opt.step()


def test_a_list_width_from_shared_overrides_is_accepted():
    dec = DeepLabV3PlusDecoder([16, 32, 64], [4, 8, 16], channels=[24, 16, 16, 16])
    assert dec.out_channels == 24


# segmentation_models_pytorch 0.6.0, smp.DeepLabV3Plus(encoder_name="resnet50", encoder_weights=None, classes=6),
# counted with smp installed outside the project's environment (it is no dependency); computed live when importable
SMP_RESNET50_6_CLASSES = 26_678_870


def test_parameter_count_is_smps_within_a_few_hundred() -> None:
    try:
        import segmentation_models_pytorch as smp

        with torch.device("meta"):
            reference = sum(p.numel() for p in smp.DeepLabV3Plus("resnet50", encoder_weights=None,
                                                                  classes=6).parameters())
    except ImportError:
        reference = SMP_RESNET50_6_CLASSES
    cfg = compose_train(["model=deeplabv3plus"])
    with torch.device("meta"):
        model = instantiate(cfg.model, modalities={"rgb": 3}, num_classes=6)
    n = sum(p.numel() for p in model.parameters())
    assert model.decoder.aspp.branches[1][0].groups == model.decoder.aspp.branches[1][0].in_channels  # separable
    assert abs(n - reference) <= 300, (n, reference)  # smp's pooling branch: BatchNorm (512) vs our conv bias (256)
