"""The temporal-attention 3-D U-Net: shared model suite per fusion level, pad-mask invariance, refusals."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch

from segplat.errors import ConfigError
from segplat.models.encoders.temporal import TemporalPool, compact_time, resample_time
from segplat.models.unet3d import UNet3D
from tests.models.base_tester import ModelTester, refusal

TIMES = {"s2": 5, "s1": 3}
FUSIONS = ({"level": "mid", "type": "attention"}, {"level": "early"}, {"level": "mid", "type": "concat"},
           {"level": "late", "type": "concat"}, {"level": "late", "type": "attention"})


def build(modalities, num_classes, fusion=None):
    fusion = fusion or {"level": "mid", "type": "attention"}
    return UNet3D(modalities, num_classes, fusion=fusion, widths=(8, 16, 16), heads=2,
                  early_steps=4 if fusion["level"] == "early" else None)


def series(modalities: Mapping[str, int], batch: int = 2, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """5-D series with masks; the second sample of each stream has its last date padded (garbage values)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, c in modalities.items():
        t = TIMES.get(m, 4)
        out[m] = torch.randn(batch, t, c, size, size, generator=g)
        mask = torch.ones(batch, t, dtype=torch.bool)
        mask[-1, -1] = False
        out[m][-1, -1] = 1e4
        out[f"{m}_time_mask"] = mask
    return out


class TestUNet3D(ModelTester):
    modalities: ClassVar[Mapping[str, int]] = {"s2": 4, "s1": 2}
    size = 16
    fusions = FUSIONS
    other_channels = (1, 3)
    param_range = (30_000, 300_000)
    require_groups = ("encoder", "fusion", "decoder")

    def build(self, modalities, num_classes, fusion=None):
        return build(modalities, num_classes, fusion)

    def inputs(self, modalities=None):
        return series(modalities or self.modalities, self.batch, self.size)


def pad_dates(x: dict[str, torch.Tensor], extra: int, where: str = "end") -> dict[str, torch.Tensor]:
    """Add `extra` padded dates (huge random values, mask False) to every stream, at the end or in front."""
    out = dict(x)
    for m in [k for k in x if not k.endswith("_time_mask")]:
        b, _t, c, h, w = x[m].shape
        junk = 1e3 * torch.randn(b, extra, c, h, w)
        pad = torch.zeros(b, extra, dtype=torch.bool)
        if where == "end":
            out[m] = torch.cat([x[m], junk], 1)
            out[f"{m}_time_mask"] = torch.cat([x[f"{m}_time_mask"], pad], 1)
        else:
            out[m] = torch.cat([junk, x[m]], 1)
            out[f"{m}_time_mask"] = torch.cat([pad, x[f"{m}_time_mask"]], 1)
    return out


@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: f"{f['level']}-{f.get('type', 'concat')}")
def test_padded_dates_do_not_change_the_output(fusion):
    torch.manual_seed(0)
    model = build({"s2": 4, "s1": 2}, 3, fusion).eval()
    x = series({"s2": 4, "s1": 2}, size=12)
    with torch.no_grad():
        ref = model(x)["out"]
        padded = model(pad_dates(x, 3))["out"]
        front = model(pad_dates(x, 2, where="front"))["out"]
    assert torch.allclose(ref, padded, atol=1e-5), (ref - padded).abs().max()
    assert torch.allclose(ref, front, atol=1e-5), (ref - front).abs().max()


def test_every_stream_and_real_date_matters():
    """Changing a real date of S1 changes the output; so the mask does not hide real data."""
    torch.manual_seed(0)
    for fusion in FUSIONS:
        model = build({"s2": 4, "s1": 2}, 3, fusion).eval()
        for p in model.parameters():  # the zero-initialised cross-attention must not hide S1 in this check
            if p.dim() > 1 and p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.1)
        x = series({"s2": 4, "s1": 2}, size=12)
        y = dict(x)
        y["s1"] = x["s1"].clone()
        y["s1"][:, 0] += 1.0
        with torch.no_grad():
            assert not torch.allclose(model(x)["out"], model(y)["out"], atol=1e-4), fusion


def test_pad_mask_is_honoured_in_pooling_and_resampling():
    x = torch.randn(2, 3, 4, 2, 2)
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    x[0, :, 1] = float("nan")
    compact, cmask, pos = compact_time(x, mask)
    assert cmask.tolist() == [[True, True, False, False], [True] * 4]
    assert torch.equal(compact[0, :, 1], x[0, :, 2]) and torch.isfinite(compact).all()
    assert pos[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    mean = TemporalPool(3, "mean")(compact, cmask)
    assert torch.allclose(mean[0], (x[0, :, 0] + x[0, :, 2]) / 2, atol=1e-6)
    att = TemporalPool(3, "attention", groups=1)(compact, cmask)
    assert torch.isfinite(att).all()
    # n == steps: identity; 2 real dates onto 3 slots: the middle slot is their average
    assert torch.allclose(resample_time(compact[1:], cmask[1:], 4), compact[1:])
    mid = resample_time(compact[:1], cmask[:1], 3)
    assert torch.allclose(mid[0, :, 1], (x[0, :, 0] + x[0, :, 2]) / 2, atol=1e-6)


def test_dates_are_used_as_positions():
    torch.manual_seed(0)
    model = build({"s2": 4, "s1": 2}, 3, {"level": "mid", "type": "concat"}).eval()
    x = series({"s2": 4, "s1": 2}, size=8)
    with torch.no_grad():
        a = model(x)["out"]
        b = model({**x, "s2_dates": torch.tensor([[0, 30, 60, 90, 120]] * 2)})["out"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kwargs, words", [
    ({"fusion": {"level": "early", "type": "attention"}}, "fusion.type=attention"),
    ({"attn_levels": [5]}, "model.attn_levels"),
    ({"pool": "max"}, r"^model\.pool=max is not known; use attention or mean; the masked temporal collapse"),
    ({"time_kernel": 2}, "model.time_kernel"),
    ({"time_kernel": 0}, r"^model\.time_kernel=0 must be a positive integer; odd \(1, 3, 5, \.\.\.\)"),
    ({"widths": [8]}, r"^model\.widths=\[8\] must be a list of at least 2 positive integers; channels per level"),
    ({"early_steps": 0}, r"^model\.early_steps=0 must be a positive integer or null; date slots"),
    ({"heads": 0}, r"^model\.heads=0 must be a positive integer\.$"),
    ({"head_dropout": 1.0}, r"^model\.head_dropout=1 must be a number of at least 0 and below 1\.$"),
    ({"pol": "mean"}, r"^model\.pol is not a key of model; did you mean model\.pool\?$"),
    # both did nothing without a word: one head where heads did not divide a width, early_steps off early fusion
    ({"heads": 3}, r"^model\.heads=3 must divide the width of every attention level \(model\.widths at "
                   r"model\.attn_levels: \[16\]; \[16\] do not\)"),
    ({"early_steps": 4}, r"^model\.early_steps=4 sets the date slots of early fusion, but fusion\.level=mid"),
])
def test_bad_config_is_refused(kwargs, words):
    keys = {"fusion": {"level": "mid"}, "widths": [8, 16], **kwargs}
    assert re.search(words, refusal(UNet3D, keys, lambda: UNet3D({"s2": 4, "s1": 2}, 3, **keys)))


def test_wrong_band_count_is_refused():
    model = build({"s2": 4, "s1": 2}, 3, {"level": "mid"})
    x = series({"s2": 5, "s1": 2}, size=8)
    with pytest.raises(ConfigError, match="s2 has 5 bands"):
        model(x)


def test_single_stream_and_plain_images():
    model = build({"s2": 4}, 3, {"level": "early"}).eval()
    with torch.no_grad():
        assert model(series({"s2": 4}, size=8))["out"].shape == (2, 3, 8, 8)
        assert model({"s2": torch.randn(2, 4, 8, 8)})["out"].shape == (2, 3, 8, 8)
