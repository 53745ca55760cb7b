"""MS2MNet: the shared model suite on a tiny backbone, the state-space scan against its recurrence, the parts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch

from segplat.errors import ConfigError
from segplat.models.ms2mnet import (
    DSMEdges,
    MS2MNet,
    MultiScaleSSM,
    selective_scan,
    selective_scan_reference,
)
from tests.models.base_tester import ModelTester


def build(modalities, num_classes, fusion=None, **kwargs):
    return MS2MNet(modalities, num_classes, fusion, **{"backbone": "resnet10t", "decoder_channels": (32, 16, 16, 16),
                                                       "d_state": 4, "edge_channels": 8, **kwargs})


class TestMS2MNet(ModelTester):
    modalities: ClassVar[Mapping[str, int]] = {"irrg": 3, "dsm": 1}
    size = 32
    fusions = ({"level": "mid", "type": "wase_vfe"},)
    aux_keys = ("f2", "f3")
    other_channels = (1, 4)
    # two resnet10t trunks cut after layer3 (1.25M each), WASE+VFE (~0.9M), a small decoder (~0.1M)
    param_range = (3_000_000, 4_000_000)
    require_groups = ("encoder", "fusion", "decoder")

    def build(self, modalities, num_classes, fusion=None):
        return build(modalities, num_classes, fusion)


@pytest.mark.parametrize("length", [1, 7, 16, 33])
def test_parallel_scan_matches_the_recurrence(length):
    g = torch.Generator().manual_seed(length)
    b, d, n = 2, 5, 3
    u = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g, dtype=torch.float64))
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 4
    B = torch.randn(b, length, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, length, n, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    y, h = selective_scan(u, delta, A, B, C, D)
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D)
    assert torch.allclose(y, y_ref, atol=1e-10) and torch.allclose(h, h_ref, atol=1e-10)


def test_scan_is_causal_and_stable_on_long_sequences():
    torch.manual_seed(0)
    u = torch.randn(1, 4096, 4)
    delta = torch.full((1, 4096, 4), 5.0)  # strong decay: exp(-80) per step would overflow a naive cumsum form
    A = -torch.full((4, 2), 16.0)
    B, C = torch.randn(1, 4096, 2), torch.randn(1, 4096, 2)
    y, _ = selective_scan(u, delta, A, B, C)
    assert torch.isfinite(y).all()
    u2 = u.clone()
    u2[:, 3000:] += 1.0
    y2, _ = selective_scan(u2, delta, A, B, C)
    assert torch.equal(y[:, :3000], y2[:, :3000]) and not torch.equal(y[:, 3000:], y2[:, 3000:])


def test_ssm_mixer_sees_the_whole_map():
    """Four scan directions: a change in one corner reaches the opposite corner (beyond any conv's reach)."""
    torch.manual_seed(0)
    mixer = MultiScaleSSM(8, d_state=4).eval()
    with torch.no_grad():
        mixer.dt_proj.bias.fill_(0.0)  # slower decay, so the effect is far above rounding
        x = torch.randn(1, 8, 12, 12)
        y = mixer(x)
        x2 = x.clone()
        x2[..., 0, 0] += 5.0
        y2 = mixer(x2)
    assert y.shape == x.shape
    assert (y2 - y)[..., -1, -1].abs().max() > 1e-6


def test_dsm_edges_follow_height_steps():
    edges = DSMEdges(1, width=4)
    dsm = torch.zeros(1, 1, 16, 16)
    dsm[..., :, 8:] = 10.0  # a vertical wall
    g = edges.gradients(dsm)
    magnitude = g[0, 2]
    assert magnitude[:, 7:9].min() > 1.0 and magnitude[:, :6].max() < 1e-2
    assert g[0, 1].abs().max() < 1e-6  # no vertical gradient


def test_default_build_is_two_resnet50_trunks_to_layer3():
    import timm

    model = MS2MNet({"irrg": 3, "dsm": 1}, 6)
    net = timm.create_model("resnet50", num_classes=0)
    trunk = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in net.layer4.parameters())
    trunk_dsm = trunk - net.conv1.weight.numel() * 2 // 3  # the DSM stream's first conv takes 1 band, not 3
    groups = model.grouped_parameters()
    assert sum(p.numel() for _, p in groups["encoder"]) == trunk + trunk_dsm
    assert model.encoders["optical"].out_channels == [64, 256, 512, 1024]
    assert groups["fusion"] and groups["decoder"]


def test_aux_heads_only_in_training():
    model = build({"irrg": 3, "dsm": 1}, 5).eval()
    with torch.no_grad():
        out = model({"irrg": torch.randn(1, 3, 32, 32), "dsm": torch.randn(1, 1, 32, 32)})
    assert set(out) == {"out"}


def test_dsm_stream_matters():
    torch.manual_seed(0)
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
    ({"irrg": 3, "dsm": 1}, {"vfe_stages": [4]}, "model.vfe_stages"),
])
def test_bad_config_is_refused(modalities, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        build(modalities, 5, **kwargs)
