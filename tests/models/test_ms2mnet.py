"""MS2MNet: the shared model suite on a tiny backbone; the released structure (keys, shapes, parameter counts
measured from the release's own code, in tests/models/data/ms2mnet_release.json, and torchvision's ResNet-50
for the streams); the figure-based parts (VFE, MSSM, ASAF, DFE) by what their figures define."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.nn import functional as F

from segplat.models.ms2mnet import DFE, MSSM, VFE, ASAFFusion, MS2MNet, WASEFusion
from tests.models.base_tester import ModelTester, refusal

RELEASE = json.loads((Path(__file__).parent / "data" / "ms2mnet_release.json").read_text())


def build(modalities, num_classes, fusion=None, **kwargs):
    return MS2MNet(modalities, num_classes, fusion, **{"backbone": "resnet10t", "decode_channels": 32,
                                                       "state_dims": (4, 4, 4, 4), "vfe_mlp_ratio": 1.0, **kwargs})


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TestMS2MNet(ModelTester):
    modalities: ClassVar[Mapping[str, int]] = {"irrg": 3, "dsm": 1}
    size = 32
    fusions = ({"level": "mid", "type": "wase_vfe"},)
    aux_keys = ("f2", "f3")
    other_channels = (4,)  # the DSM's 1 band is the default build's
    # two resnet10t trunks to layer3 (~1.2M each), VFEs at ratio 1 (~2M), a 32-wide HFPDecoder (~0.2M)
    param_range = (4_000_000, 6_000_000)
    require_groups = ("encoder", "fusion", "decoder")

    def build(self, modalities, num_classes, fusion=None):
        return build(modalities, num_classes, fusion)


# ------------------------------------------------------------------ the released structure
@pytest.fixture(scope="module")
def preset() -> MS2MNet:
    torch.manual_seed(0)
    return MS2MNet({"irrg": 3, "dsm": 1}, 6)


def released_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors under the release's names: torchvision's ResNet-50 for both streams (with the layer4 the
    release builds), the measured key/shape list for WASE and the HFPDecoder."""
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(1)
    resnet = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
              if not k.startswith("fc.")}
    state = {}
    for stream in ("rgb_backbone", "dsm_backbone"):
        for k, v in resnet.items():
            shape = (64, 1, 7, 7) if stream == "dsm_backbone" and k == "conv1.weight" else v.shape
            state[f"{stream}.{k}"] = v.clone() if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
    for k, shape in RELEASE["tensors"].items():
        state[k] = torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
    return state


def test_a_released_state_dict_loads_with_every_tensor_in_place(preset: MS2MNet) -> None:
    released = released_state_dict()
    used = {k: v for k, v in released.items() if ".layer4." not in k}
    result = preset.load_state_dict(used, strict=False)
    assert result.unexpected_keys == []  # every released tensor has its module, of its shape
    undefined = ("vfeBlock", "dfeBlock", "decoder.p1.", "decoder.p2.", "decoder.p3.")
    assert result.missing_keys and all(k.startswith(undefined) for k in result.missing_keys)
    assert {k.split(".")[0] for k in result.missing_keys} == {"dfeBlock", "decoder", *(f"vfeBlock{i}" for i in
                                                                                      range(1, 5))}
    own = preset.state_dict()
    for k in ("rgb_backbone.layer3.5.bn3.running_var", "decoder.b2.attn.MSC.conv2_2.weight",
              "decoder.seg_head.head.2.0.weight", "waseFusion4.weight_y", "decoder.aux_head2.0.1.bias"):
        torch.testing.assert_close(own[k], released[k])


@pytest.mark.slow
def test_release_files_load_through_pretrained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    released = released_state_dict()
    torch.save(released, tmp_path / "MS2MNet_vaihingen.pth")
    with caplog.at_level("INFO", logger="segplat.models.convert.ms2mnet"):
        model = MS2MNet({"irrg": 3, "dsm": 1}, 6, pretrained=str(tmp_path / "MS2MNet_vaihingen.pth"))
    report = model.load_report
    assert report["dropped"] and all(".layer4." in k for k in report["dropped"])
    assert len(report["dropped"]) == 2 * sum(1 for k in released if k.startswith("rgb_backbone.layer4."))
    assert any("not defined in the release" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(model.dsm_backbone.conv1.weight, released["dsm_backbone.conv1.weight"])
    with caplog.at_level("INFO", logger="segplat.models.convert.ms2mnet"):
        other = MS2MNet({"irrg": 3, "dsm": 1}, 4, pretrained=str(tmp_path / "MS2MNet_vaihingen.pth"))
    assert sorted(k for k in other.load_report["dropped"] if ".layer4." not in k) == [
        "decoder.aux_head2.2.bias", "decoder.aux_head2.2.weight", "decoder.aux_head3.2.bias",
        "decoder.aux_head3.2.weight", "decoder.seg_head.head.2.0.weight"]
    assert any("6 classes; this model predicts 4" in r.getMessage() for r in caplog.records)


def test_parameter_counts_equal_the_release(preset: MS2MNet) -> None:
    measured = RELEASE["parameters"]
    assert n_params(preset.rgb_backbone) == measured["rgb_backbone_without_layer4"]
    assert n_params(preset.dsm_backbone) == measured["dsm_backbone_without_layer4"]
    assert sum(n_params(getattr(preset, f"waseFusion{i}")) for i in range(1, 5)) == measured["wase"]
    asaf = sum(n_params(getattr(preset.decoder, p)) for p in ("p1", "p2", "p3"))
    assert n_params(preset.decoder) - asaf == measured["hfp_decoder_without_asaf"]
    for part in ("Conv1", "Conv2", "b4", "b3", "b2", "Conv3", "seg_head", "aux_head3", "aux_head2"):
        assert n_params(getattr(preset.decoder, part)) == measured[f"decoder.{part}"], part


def test_imagenet_weights_start_both_streams_the_dsm_conv_from_the_rgb_mean(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(2)
    imagenet = timm.create_model("resnet10t").state_dict()
    torch.save(imagenet, tmp_path / "resnet10t.pth")
    model = build({"irrg": 3, "dsm": 1}, 5, pretrained=str(tmp_path / "resnet10t.pth"))
    first = imagenet["conv1.0.weight"]
    torch.testing.assert_close(model.rgb_backbone.conv1[0].weight, first)
    torch.testing.assert_close(model.dsm_backbone.conv1[0].weight, first.mean(dim=1, keepdim=True))
    torch.testing.assert_close(model.dsm_backbone.layer3[0].conv1.weight, imagenet["layer3.0.conv1.weight"])
    two_bands = build({"irrg": 3, "dsm": 2}, 5, pretrained=str(tmp_path / "resnet10t.pth"))
    torch.testing.assert_close(two_bands.dsm_backbone.conv1[0].weight.sum(1, keepdim=True),
                               first.mean(dim=1, keepdim=True))


# ------------------------------------------------------------------ released parts, by their formulas
def test_wase_weights_the_streams_by_normalised_absolute_scalars() -> None:
    torch.manual_seed(3)
    wase = WASEFusion(32).eval()
    with torch.no_grad():
        wase.weight_x.fill_(-3.0)
        wase.weight_y.fill_(1.0)
        x, y = torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
        se_x = wase.fc_x(x.mean((2, 3), keepdim=True))
        se_y = wase.fc_y(y.mean((2, 3), keepdim=True))
        torch.testing.assert_close(wase(x, y), 0.75 * se_x * x + 0.25 * se_y * y)
    assert n_params(wase) == 2 * (32 * 2 + 2 + 2 * 32 + 32) + 2  # two SEs (reduction 16) and two scalars


def test_streams_stay_independent_and_fuse_only_for_the_decoder() -> None:
    torch.manual_seed(4)
    model = build({"irrg": 3, "dsm": 1}, 5).eval()
    seen = {}
    model.dsm_backbone.layer1.register_forward_hook(lambda m, i, o: seen.setdefault("dsm_in", i[0]))
    x = {"irrg": torch.randn(1, 3, 32, 32), "dsm": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        model(x)
        first = seen.pop("dsm_in")
        model({**x, "irrg": torch.randn(1, 3, 32, 32)})
    torch.testing.assert_close(seen["dsm_in"], first)  # the optical input does not reach the DSM stream


def test_aux_heads_at_strides_8_and_4_only_in_training() -> None:
    model = build({"irrg": 3, "dsm": 1}, 5).train()
    out = model({"irrg": torch.randn(2, 3, 64, 64), "dsm": torch.randn(2, 1, 64, 64)})
    assert out["f3"].shape == (2, 5, 8, 8) and out["f2"].shape == (2, 5, 16, 16)
    model.eval()
    with torch.no_grad():
        assert set(model({"irrg": torch.randn(1, 3, 64, 64), "dsm": torch.randn(1, 1, 64, 64)})) == {"out"}


def test_without_aux_heads_none_is_built_and_every_weight_trains() -> None:
    """aux_heads=false used to build both heads anyway: 1.2 M weights that never trained and stopped DDP."""
    with_aux = build({"irrg": 3, "dsm": 1}, 5)
    model = build({"irrg": 3, "dsm": 1}, 5, aux_heads=False).train()
    assert model.decoder.aux_head3 is None and model.decoder.aux_head2 is None
    assert n_params(with_aux) - n_params(model) == n_params(with_aux.decoder.aux_head3) + n_params(
        with_aux.decoder.aux_head2)
    out = model({"irrg": torch.randn(2, 3, 64, 64), "dsm": torch.randn(2, 1, 64, 64)})
    assert set(out) == {"out"}
    out["out"].mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ------------------------------------------------------------------ figure-based parts
def test_mssm_is_the_hidden_state_mixer_of_the_figure() -> None:
    """H = X (softmax_L(Delta + A) * B)^T, channel attention, H' * SiLU(Z) * gamma, readout by C: checked
    against an explicit sum over positions."""
    torch.manual_seed(5)
    mixer = MSSM(8, state_dim=3).eval()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        mixer.gamma.fill_(0.7)
        y, hidden = mixer(x)
        bcdt = mixer.BCdt_proj(x)
        g = torch.sigmoid(mixer.gate(bcdt))
        bcdt = (g * mixer.dw3(bcdt) + (1 - g) * mixer.dw5(bcdt)).flatten(2)
        dt, b_in, c_out = bcdt[:, :3], bcdt[:, 3:6], bcdt[:, 6:]
        weights = torch.exp(dt + mixer.A[None, :, None])
        weights = weights / weights.sum(-1, keepdim=True)
        h = torch.einsum("bcl,bnl->bcn", x.flatten(2), weights * b_in)
        h = h * mixer.channel_attn.gate(mixer.channel_attn.fc2(mixer.channel_attn.act(
            mixer.channel_attn.fc1(h.mean(-1)[..., None, None]))))[..., 0]
        hp, z = mixer.hz_proj(h).split(8, dim=1)
        h = mixer.out_proj(hp * F.silu(z) * 0.7)
        expected = torch.einsum("bcn,bnl->bcl", h, c_out).view(2, 8, 5, 6)
    torch.testing.assert_close(hidden, h)
    torch.testing.assert_close(y, expected)


def test_mssm_sees_the_whole_map_at_linear_cost() -> None:
    torch.manual_seed(6)
    mixer = MSSM(8, state_dim=4).eval()
    x = torch.randn(1, 8, 24, 24)
    x2 = x.clone()
    x2[..., 0, 0] += 500.0  # one of 576 positions: its softmax weight is small at initialisation
    with torch.no_grad():
        delta = (mixer(x2)[0] - mixer(x)[0])[..., -1, -1].abs().max()
    assert delta > 1e-6  # the far corner responds (a conv-only path would give exactly 0)
    with torch.no_grad():  # a 4x larger map: the hidden state keeps its size (no L x L matrix)
        assert mixer(torch.randn(1, 8, 48, 48))[1].shape == (1, 8, 4)


def test_vfe_returns_the_map_and_the_mixer_state_and_follows_the_figure_order() -> None:
    torch.manual_seed(7)
    vfe = VFE(16, state_dim=5).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        out, hidden = vfe(x)
        step = x + vfe.dwconv(x)
        mixed, _ = vfe.mixer(vfe.norm(step))
        step = step + mixed
        step = step + vfe.conv(step)
        expected = step + vfe.se(vfe.ffn(step))
    assert hidden.shape == (2, 16, 5)
    torch.testing.assert_close(out, expected)
    assert vfe.conv[0].kernel_size == (3, 3) and vfe.conv[0].groups == 1  # "Conv 3x3", not depth-wise
    assert vfe.dwconv[0].groups == 16 and isinstance(vfe.conv[2], torch.nn.ReLU)


def test_asaf_weights_the_encoder_map_by_its_own_spatial_attention() -> None:
    torch.manual_seed(8)
    asaf = ASAFFusion(8).eval()
    x_en, x = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        asaf.spatial.bias.fill_(50.0)  # w = 1: only the encoder map passes
        torch.testing.assert_close(asaf(x, x_en), asaf.post(x_en))
        asaf.spatial.bias.fill_(-50.0)  # w = 0: only the (upsampled) decoder map
        up = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(asaf(x, x_en), asaf.post(up))


def test_dfe_starts_as_the_identity_and_sees_height_steps() -> None:
    dfe = DFE(1)
    dsm = torch.zeros(1, 1, 16, 16)
    dsm[..., :, 8:] = 10.0  # a vertical wall
    torch.testing.assert_close(dfe(dsm), dsm)
    g = dfe.gradients(dsm)
    assert g[0, 2][:, 7:9].min() > 1.0 and g[0, 2][:, :6].max() < 1e-2
    assert g[0, 1].abs().max() < 1e-6  # no vertical gradient


def test_dsm_stream_matters() -> None:
    torch.manual_seed(9)
    model = build({"irrg": 3, "dsm": 1}, 5).eval()
    x = {"irrg": torch.randn(1, 3, 32, 32), "dsm": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        a = model(x)["out"]
        b = model({**x, "dsm": torch.randn(1, 1, 32, 32)})["out"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("modalities, kwargs, words", [
    ({"irrg": 3, "dsm": 1}, {"fusion": {"level": "mid", "type": "concat"}}, "fusion.type=concat"),
    ({"irrg": 3, "dsm": 1, "ndsm": 1}, {}, "exactly two modalities"),
    ({"irrg": 3, "dsm": 1}, {"backbone": "vit_tiny_patch16_224"}, "model.backbone"),
    ({"irrg": 3, "dsm": 1}, {"state_dims": [16, 24]}, r"^model\.state_dims=\[16,24\] must be a list of 4 positive "
                                                      r"integers; one VFE state size per stage"),
    ({"irrg": 3, "dsm": 1}, {"decode_channels": 40}, "model.decode_channels=40"),
    ({"irrg": 3, "dsm": 1}, {"dropout": 1}, r"^model\.dropout=1 must be a number of at least 0 and below 1\.$"),
])
def test_bad_config_is_refused(modalities, kwargs, words):
    assert re.search(words, refusal(MS2MNet, kwargs, lambda: build(modalities, 5, **kwargs)))
