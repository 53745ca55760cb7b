"""The device preprocessor: the NumPy path against plain-torch references; the CuPy path against NumPy on a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segplat.data.layouts.base import ModalitySpec
from segplat.data.preprocess import PhotometricAugment, Preprocessor, box_mean

SPECS = {
    "rgb": ModalitySpec(("r", "g", "b"), nodata=0, dtype="uint16", optical=True),
    "sar": ModalitySpec(("vv", "vh"), nodata=float("nan"), dtype="float32", optical=False),
    "s2": ModalitySpec(("b2", "b3"), nodata=0, dtype="int16", optical=True, temporal=True, max_time=4),
}
STATS = {
    "rgb": {"mean": [900.0, 1000.0, 1100.0], "std": [100.0, 120.0, 140.0], "p2": [700.0, 750.0, 800.0],
            "p98": [1100.0, 1250.0, 1400.0]},
    "sar": {"mean": [-12.0, -18.0], "std": [3.0, 4.0], "p2": [-20.0, -28.0], "p98": [-5.0, -9.0]},
    "s2": {"mean": [1500.0, 1600.0], "std": [300.0, 200.0], "p2": [900.0, 1100.0], "p98": [2100.0, 2200.0]},
}


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(600, 1500, (3, 3, 24, 24)).astype(np.uint16)
    rgb[0, :, :4, :4] = 0  # no-data corner
    sar = rng.normal(-14, 3, (3, 2, 24, 24)).astype(np.float32)
    sar[1, :, 5:9] = np.nan
    s2 = rng.integers(800, 2300, (3, 4, 2, 24, 24)).astype(np.int16)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    s2[~mask] = 0
    dates = np.where(mask, np.arange(4) * 10, -1).astype(np.int32)
    return {"rgb": torch.from_numpy(rgb), "sar": torch.from_numpy(sar), "s2": torch.from_numpy(s2),
            "s2_time_mask": torch.from_numpy(mask), "s2_dates": torch.from_numpy(dates),
            "label": torch.zeros(3, 24, 24, dtype=torch.int64)}


def torch_normalise(x: torch.Tensor, m: str, extra_invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Independent reference: float, (x - mean) / std, no-data (value, NaN, padding) -> 0."""
    spec, st = SPECS[m], STATS[m]
    x = x.to(torch.float32)
    shape = (1,) * (x.ndim - 3) + (-1, 1, 1)
    mean, std = torch.tensor(st["mean"]).view(shape), torch.tensor(st["std"]).view(shape)
    bad = torch.isnan(x)
    if not (isinstance(spec.nodata, float) and math.isnan(spec.nodata)):
        bad |= x == spec.nodata
    if extra_invalid is not None:
        bad |= extra_invalid
    return torch.where(bad, torch.zeros(()), (x - mean) / std)


def test_normalisation_matches_torch_and_masks_nodata() -> None:
    batch = make_batch()
    pre = Preprocessor(SPECS, STATS, ["rgb", "sar", "s2"])
    out = pre(batch, train=False)
    pad = ~batch["s2_time_mask"][:, :, None, None, None].expand_as(batch["s2"])
    for m, extra in (("rgb", None), ("sar", None), ("s2", pad)):
        assert out[m].dtype == torch.float32
        torch.testing.assert_close(out[m], torch_normalise(batch[m], m, extra), rtol=1e-6, atol=1e-6)
    assert (out["rgb"][0, :, :4, :4] == 0).all() and (out["sar"][1, :, 5:9] == 0).all()
    assert (out["s2"][1, 2:] == 0).all() and torch.isfinite(out["sar"]).all()
    assert out["s2_time_mask"] is batch["s2_time_mask"] and out["s2_dates"] is batch["s2_dates"]
    assert "label" not in out


def torch_photometric(x: torch.Tensor, m: str, p: dict[str, np.ndarray]) -> torch.Tensor:
    """Reference for gamma -> contrast -> brightness in the unit range of a non-temporal modality with nodata 0."""
    st = STATS[m]
    lo = torch.tensor(st["p2"]).view(1, -1, 1, 1)
    span = torch.tensor(st["p98"]).view(1, -1, 1, 1) - lo
    x = x.to(torch.float32)
    valid = x != 0
    u = (x - lo) / span
    w = valid.float()

    def vmean(v: torch.Tensor) -> torch.Tensor:
        return (v * w).sum((2, 3), keepdim=True) / w.sum((2, 3), keepdim=True).clamp_min(1)

    u = torch.where(valid, u, vmean(u))
    c = u.clamp(0, 1)
    u = u + c ** torch.from_numpy(p["gamma"]).view(-1, 1, 1, 1) - c
    mu = vmean(u)
    u = (u - mu) * torch.from_numpy(p["contrast"]).view(-1, 1, 1, 1) + mu
    u = u + torch.from_numpy(p["brightness"]).view(-1, 1, 1, 1)
    x = u * span + lo
    return torch_normalise(torch.where(valid, x, torch.zeros(())), m, ~valid)


def test_photometric_matches_torch_reference_and_only_touches_optical() -> None:
    batch = make_batch(1)
    photo = PhotometricAugment(brightness=0.2, contrast=0.3, gamma=0.4, p=1.0)
    pre = Preprocessor(SPECS, STATS, ["rgb", "sar"], photo, seed=3)
    out = pre(batch, train=True, epoch=2, step=5)
    params = photo.params(np.random.default_rng([3, 2, 5, 7]), 3)  # the generator the preprocessor uses
    assert (params["gamma"] != 1).all() and (params["contrast"] != 1).all()
    torch.testing.assert_close(out["rgb"], torch_photometric(batch["rgb"], "rgb", params), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["sar"], torch_normalise(batch["sar"], "sar"))  # radar: never photometric
    assert (out["rgb"][0, :, :4, :4] == 0).all()
    again = pre(batch, train=True, epoch=2, step=5)
    other = pre(batch, train=True, epoch=2, step=6)
    torch.testing.assert_close(out["rgb"], again["rgb"], rtol=0, atol=0)
    assert not torch.allclose(out["rgb"], other["rgb"])
    plain = pre(batch, train=False)
    torch.testing.assert_close(plain["rgb"], torch_normalise(batch["rgb"], "rgb"))


def test_box_mean_and_hue_and_local_contrast() -> None:
    u = np.random.default_rng(0).random((2, 3, 20, 20)).astype(np.float32)
    for k in (1, 4, 7):
        r = k // 2  # the window starts r pixels before the centre: pad r before, k - r - 1 after
        ref = F.avg_pool2d(F.pad(torch.from_numpy(u), (r, k - r - 1, r, k - r - 1), mode="replicate"), k, stride=1)
        np.testing.assert_allclose(box_mean(np, u, k), ref.numpy(), atol=1e-6)
    # hue: 0 degrees is the identity, 120 degrees permutes the channels, the grey level is kept
    params = {"hue": np.array([0.0, 120.0], np.float32)}
    rot = PhotometricAugment._rotate_hue(np, u, params["hue"], 1)
    np.testing.assert_allclose(rot[0], u[0], atol=1e-6)
    np.testing.assert_allclose(rot[1], u[1][[2, 0, 1]], atol=1e-5)
    np.testing.assert_allclose(rot.sum(1), u.sum(1), atol=1e-5)
    # local contrast raises the difference to the local mean, clipped
    aug = PhotometricAugment(brightness=0, contrast=0, local_contrast=1.0, local_window=5, local_clip=0.05, p=1.0)
    p = aug.params(np.random.default_rng(0), 2)
    out = aug.apply(np, u, p)
    delta = out - u
    assert np.abs(delta).max() <= 0.05 * p["local"].max() + 1e-6
    assert (np.sign(delta) == np.sign(u - box_mean(np, u, 5)))[np.abs(delta) > 1e-4].all()


@pytest.mark.gpu
def test_cupy_path_equals_numpy_path() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy")
    photo = PhotometricAugment(brightness=0.2, contrast=0.2, gamma=0.3, saturation=0.2, hue=15, local_contrast=0.5,
                               p=1.0)
    pre = Preprocessor(SPECS, STATS, ["rgb", "sar", "s2"], photo, seed=1)
    batch = make_batch(2)
    cpu = pre(batch, train=True, epoch=1, step=3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # runs on torch's current stream, whichever it is
        gpu_batch = {k: v.cuda() for k, v in batch.items()}
        gpu = pre(gpu_batch, train=True, epoch=1, step=3)
        ptr = gpu_batch["rgb"].data_ptr()
    side.synchronize()
    for m in ("rgb", "sar", "s2"):
        assert gpu[m].is_cuda
        torch.testing.assert_close(gpu[m].cpu(), cpu[m], rtol=1e-4, atol=1e-4)
    assert gpu["s2_time_mask"].data_ptr() == gpu_batch["s2_time_mask"].data_ptr()
    assert ptr == gpu_batch["rgb"].data_ptr()
