"""DualStream (MiT-B1 + ConvNeXt air stream, FiLM/gate + cross-attention, ASPP-gated decoder)."""

from __future__ import annotations

import functools
from typing import ClassVar

import pytest
import torch

import segplat
from segplat.errors import ConfigError
from segplat.models.dualstream import DualStream
from segplat.models.encoders import TimmEncoder
from segplat.models.encoders.convnext_stream import ConvNeXtStream
from segplat.models.fusion.cross_attention import CrossAttentionFusion
from segplat.models.fusion.film_gate import FiLMGateFusion
from tests.conftest import compose_train
from tests.models.base_tester import ModelTester, refusal

SMALL_DECODER = {"channels": [32, 32, 16], "aspp_channels": 32}
SMALL_AIR = {"dims": [16, 24, 32, 48], "depths": [1, 1, 1, 1]}


class TestDualStream(ModelTester):
    """The preset's architecture (MiT-B1 vision stream) on a 64x64x4 image over an 8x8x48 grid."""

    modalities: ClassVar[dict[str, int]] = {"image": 4, "air": 48}
    sizes: ClassVar[dict[str, tuple[int, int]]] = {"image": (64, 64), "air": (8, 8)}
    aux_keys = ("f2", "f3")
    other_channels = (1,)
    require_groups = ("encoder", "fusion", "decoder")
    # MiT-B1 is 13.1M (SegFormer paper); with the default air stream, fusion and decoder ~22.3M
    param_range = (20_000_000, 25_000_000)

    def build(self, modalities, num_classes, fusion=None):
        return DualStream(modalities, num_classes, fusion)


def small_model(**kwargs) -> DualStream:
    from segplat.models.encoders.mit import mit_b0

    kwargs.setdefault("vision_encoder", functools.partial(mit_b0, drop_path_rate=0.0))
    kwargs.setdefault("air", SMALL_AIR)
    kwargs.setdefault("decoder", SMALL_DECODER)
    return DualStream({"image": 4, "air": 48}, 3, **kwargs)


def inputs(batch: int = 2, air_size: int = 8) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(batch, 4, 64, 64), "air": torch.randn(batch, 48, air_size, air_size)}


def test_initial_output_is_the_vision_only_path():
    torch.manual_seed(0)
    model = small_model().eval()
    x = inputs()
    with torch.no_grad():
        fused = model(x)["out"]
        vision_only = model.forward_vision_only(x["image"])["out"]
        other_air = model({**x, "air": 5 * torch.randn_like(x["air"])})["out"]
    torch.testing.assert_close(fused, vision_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused, other_air, rtol=0, atol=1e-6)


def test_fusion_learns_away_from_identity():
    """At init the fusion parameters get gradients; after one step the air stream changes the output."""
    torch.manual_seed(0)
    model = small_model()
    x = inputs()
    target = torch.randint(0, 3, (2, 64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(x)
    loss = sum(torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(v, size=(64, 64), mode="bilinear"), target) for v in out.values())
    loss.backward()
    film, cross = model.fusion["0"], model.fusion["3"]
    assert isinstance(film, FiLMGateFusion) and isinstance(cross, CrossAttentionFusion)
    assert film.gamma.weight.grad.abs().sum() > 0 and film.beta.weight.grad.abs().sum() > 0
    assert cross.proj.weight.grad.abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        a = model(x)["out"]
        b = model({**x, "air": torch.randn_like(x["air"])})["out"]
    assert not torch.allclose(a, b, atol=1e-5), "after a step the air stream must influence the logits"


def test_mit_stream_is_fused_inside_the_encoder():
    """With MiT the stage-1 fused map feeds stage 2: perturbing only FiLM at stage 0 changes the deepest map."""
    torch.manual_seed(0)
    model = small_model(fusion={"level": "mid", "type": "film_cross_attention", "stages": [0, 1, 3]}).eval()
    assert model.interleave and list(model.fusion) == ["0", "1", "3"]
    x = inputs(1)
    with torch.no_grad():
        a = model.encode(x["image"], x["air"])
        torch.nn.init.normal_(model.fusion["0"].beta.weight, std=0.5)
        b = model.encode(x["image"], x["air"])
    assert not torch.allclose(a[3], b[3])


def test_any_pyramid_encoder_fused_level_by_level():
    torch.manual_seed(0)
    enc = functools.partial(TimmEncoder, name="resnet10t", out_indices=(1, 2, 3, 4))
    model = DualStream({"rgb": 3, "grid": 6}, 4, vision_encoder=enc, air=SMALL_AIR, decoder=SMALL_DECODER)
    assert not model.interleave
    model.train()
    x = {"rgb": torch.randn(2, 3, 64, 64), "grid": torch.randn(2, 6, 5, 5)}  # odd grid size
    out = model(x)
    assert out["out"].shape == (2, 4, 64, 64)
    assert out["f2"].shape[-2:] == (8, 8) and out["f3"].shape[-2:] == (4, 4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["out"], model.forward_vision_only(x["rgb"])["out"], rtol=0, atol=1e-6)


def test_no_aux_outputs_in_eval_mode():
    model = small_model().eval()
    with torch.no_grad():
        assert set(model(inputs(1))) == {"out"}


def test_convnext_stream_keeps_the_grid_resolution():
    stream = ConvNeXtStream(48, dims=(8, 8, 16, 16), depths=(1, 1, 1, 1))
    feats = stream(torch.randn(1, 48, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(64, 64), (64, 64), (32, 32), (16, 16)]
    assert stream.reductions == [1, 1, 2, 4]
    odd = stream(torch.randn(1, 48, 7, 7))
    assert [f.shape[-1] for f in odd] == [7, 7, 4, 2]


def test_film_gate_identity_then_modulates():
    torch.manual_seed(0)
    film = FiLMGateFusion(16, 8).eval()
    v, a = torch.randn(2, 16, 12, 12), torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(film(v, a), v)
    torch.nn.init.normal_(film.gamma.weight, std=0.5)
    out = film(v, a)
    assert out.shape == v.shape and not torch.allclose(out, v)


def test_cross_attention_identity_and_position_aware():
    torch.manual_seed(0)
    cross = CrossAttentionFusion(32, 16).eval()
    assert cross.heads == 1
    v, a = torch.randn(1, 32, 8, 8), torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(cross(v, a), v)
    torch.nn.init.normal_(cross.proj.weight, std=0.1)
    # the same air values at permuted positions must give a different result (coordinates are embedded)
    flipped = torch.flip(a, dims=(-1,))
    assert not torch.allclose(cross(v, a), cross(v, flipped), atol=1e-6)
    # a larger air map than the visual one is pooled to the visual size
    assert cross(v, torch.randn(1, 16, 32, 32)).shape == v.shape


def test_invalid_configurations_are_refused():
    with pytest.raises(ConfigError, match="exactly two modalities"):
        DualStream({"a": 3, "b": 2, "c": 1}, 3)
    with pytest.raises(ConfigError, match=r"fusion\.type=concat.*valid types: film_cross_attention"):
        DualStream({"a": 3, "b": 2}, 3, {"level": "mid", "type": "concat"})
    with pytest.raises(ConfigError, match=r"fusion\.stages"):
        small_model(fusion={"level": "mid", "type": "film_cross_attention", "stages": [4]})
    assert refusal(DualStream, {"air": {"widths": [1]}}) == ("model.air.widths is not a key of model.air; did you mean "
                                                            "model.air.depths?")
    assert refusal(DualStream, {"air": {"strides": [1, 3]}}) == (
        "model.air.strides=[1,3] must be a list of one of 1, 2 or null; per stage: 1 keeps the grid's size, 2 halves "
        "it.")
    assert refusal(DualStream, {"decoder": {"rates": [3, 0]}}).startswith(
        "model.decoder.rates=[3,0] must be a list of positive integers or null")
    assert refusal(DualStream, {"decoder": "wide"}).startswith("model.decoder=wide must be a section with the keys "
                                                                "channels, aspp_channels")
    assert refusal(DualStream, {"heads": 0}) == ("model.heads=0 must be a positive integer or null; null = "
                                                "channels // 64.")
    with pytest.raises(ConfigError, match=r"^model\.air\.dims has 3 stages but the vision encoder has 4"):
        small_model(air={"dims": [8, 8, 8], "depths": [1, 1, 1], "strides": [1, 1, 2]})
    with pytest.raises(ConfigError, match=r"^model\.aux_levels=\[1\] must lie in 2\.\.4"):
        small_model(aux_levels=[1])


def test_preset_composes_and_builds(tmp_path):
    cfg = compose_train(["model=dualstream", "model.vision_encoder._target_=segplat.models.encoders.mit.mit_b0",
                         "model.air.dims=[16,16,32,32]", "model.decoder.channels=[32,16,16]",
                         "model.decoder.aspp_channels=32"], tmp_path)
    assert cfg.model.fusion.type == "film_cross_attention" and cfg.model.vision_pretrained is None
    model = segplat.create_model("dualstream", {"image": 4, "air": 48}, 5,
                                 vision_encoder={"_target_": "segplat.models.encoders.mit.mit_b0"},
                                 air={"dims": [16, 16, 32, 32]},
                                 decoder={"channels": [32, 16, 16], "aspp_channels": 32}).train()
    assert isinstance(model, DualStream) and model.encoders["air"].stem[0].in_channels == 48
    out = model(inputs())
    assert set(out) == {"out", "f2", "f3"} and out["out"].shape == (2, 5, 64, 64)


def test_film_stages_must_be_fused_stages():
    """film_stages=[5] on a 4-stage pyramid silently made every stage cross-attention."""
    with pytest.raises(ConfigError, match=r"model\.film_stages=\[5\] names stage\(s\) \[5\] outside 0\.\.3"):
        small_model(film_stages=[5])
    with pytest.raises(ConfigError, match=r"names stage\(s\) \[0, 1\] not fused \(fused stages: \[2, 3\]\)"):
        small_model(fusion={"level": "mid", "type": "film_cross_attention", "stages": [2, 3]})
    assert {type(m).__name__ for m in small_model(film_stages=[]).fusion.values()} == {"CrossAttentionFusion"}
