"""CPU augmentation: one geometry for every modality (at any resolution) and the label, no-data kept, copy-paste."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from segplat.data.augment_copy_paste import CopyPaste, StoreDonor, sample_mask
from segplat.data.layouts.base import ModalitySpec
from segplat.data.store import prepare_store
from segplat.data.synthetic import SyntheticClouds
from segplat.data.transforms import Compose, GeometricAugment, build_augment, warp
from segplat.errors import ConfigError
from segplat.schema import check_targets
from tests.conftest import TINY, compose_train


def rotation_about_centre(size: int, quarter_turns: int) -> np.ndarray:
    """Forward affine (label pixels) of a counter-clockwise rotation by 90 degrees, as np.rot90 does."""
    c = (size - 1) / 2
    a = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1.0]])  # (x, y) -> (y, -x): np.rot90 on (rows, cols)
    t = np.array([[1, 0, c], [0, 1, c], [0, 0, 1.0]])
    m = t @ np.linalg.matrix_power(a, quarter_turns) @ np.linalg.inv(t)
    return m


def test_affine_is_conjugated_into_coarser_grids() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (64, 64)).astype(np.uint8)
    grid = rng.normal(size=(3, 8, 8)).astype(np.float32)  # a 1/8 grid
    m = rotation_about_centre(64, 1)
    np.testing.assert_array_equal(warp(label, m, 1.0, nearest=True, border=255), np.rot90(label))
    np.testing.assert_array_equal(warp(grid, m, 8 / 64, nearest=True, border=None), np.rot90(grid, axes=(1, 2)))
    # a shift of 16 label pixels is 2 grid pixels: same content, same place
    shift = np.array([[1, 0, 16], [0, 1, -8], [0, 0, 1.0]])
    moved = warp(grid, shift, 8 / 64, nearest=False, border=np.nan, mask_nodata=True)
    np.testing.assert_array_equal(moved[:, :7, 2:], grid[:, 1:, :6])  # right by 2, up by 1
    assert np.isnan(moved[:, :, :2]).all() and np.isnan(moved[:, 7]).all()
    moved_label = warp(label, shift, 1.0, nearest=True, border=255)
    np.testing.assert_array_equal(moved_label[:56, 16:], label[8:, :48])
    assert (moved_label[:, :16] == 255).all() and (moved_label[56:] == 255).all()


def test_ssr_keeps_modalities_aligned_and_borders_right() -> None:
    rng = np.random.default_rng(1)
    # the image and the grid both encode the same 8x8 checker board: aligned iff they agree after warping
    board = (np.indices((8, 8)).sum(0) % 2).astype(np.uint16)
    image = np.kron(board, np.ones((8, 8), np.uint16))[None] * 1000 + 1000  # 1000 / 2000, no 0 = nodata inside
    grid = board[None].astype(np.float32)
    label = np.kron(board, np.ones((8, 8), np.uint8)).astype(np.uint8)
    aug = GeometricAugment(hflip=0.5, vflip=0.5, rot90=0.5, ssr=1.0, shift_limit=0.1, scale_limit=0.0,
                           rotate_limit=0.0, interpolation="linear", nodata={"image": 0, "grid": float("nan")})
    for seed in range(5):
        out = aug({"image": image.copy(), "grid": grid.copy(), "label": label.copy()}, np.random.default_rng(seed))
        inside = out["label"] != 255
        assert (~inside).any(), "the shift must move some pixels out"
        assert (out["image"][0][~inside] == 0).all()  # nodata as the data border
        vals = out["image"][0][inside]
        assert ((vals >= 1000) & (vals <= 2000)).all()  # never blended with the 0 border
        np.testing.assert_array_equal(out["label"][inside], (out["image"][0][inside] >= 1500).astype(np.uint8))
    del rng


def test_temporal_stacks_and_dates() -> None:
    rng = np.random.default_rng(2)
    stack = rng.integers(1, 100, (5, 2, 32, 32)).astype(np.int16)
    dates = np.array([3, 10, 20, -1, -1], np.int32)
    sample = {"s2": stack, "s2_dates": dates, "s2_time_mask": dates >= 0,
              "label": rng.integers(0, 3, (32, 32)).astype(np.uint8)}
    aug = GeometricAugment(hflip=1.0, vflip=0.0, rot90=1.0, ssr=1.0, rotate_limit=20, nodata={"s2": 0})
    out = aug(dict(sample), np.random.default_rng(7))
    assert out["s2"].shape == stack.shape and out["s2"].dtype == np.int16
    assert out["s2_dates"] is dates and out["s2_time_mask"] is sample["s2_time_mask"]
    one = aug({"s2": stack[2:3], "label": sample["label"]}, np.random.default_rng(7))
    np.testing.assert_array_equal(out["s2"][2], one["s2"][0])
    assert (out["label"] != sample["label"]).any()


def test_same_generator_same_result_and_flip_semantics() -> None:
    x = {"a": np.arange(16, dtype=np.uint8).reshape(1, 4, 4), "label": np.arange(16, dtype=np.uint8).reshape(4, 4)}
    out = GeometricAugment(hflip=1.0, vflip=0.0, rot90=0.0)(x, np.random.default_rng(0))
    np.testing.assert_array_equal(out["label"], x["label"][:, ::-1])
    aug = GeometricAugment(scale_crop=1.0, scale_range=(1.2, 2.0), ssr=0.5)
    big = {"a": np.random.default_rng(0).integers(0, 255, (2, 32, 32)).astype(np.uint8),
           "label": np.random.default_rng(1).integers(0, 4, (32, 32)).astype(np.uint8)}
    o1, o2 = aug(big, np.random.default_rng(5)), aug(big, np.random.default_rng(5))
    np.testing.assert_array_equal(o1["a"], o2["a"])
    np.testing.assert_array_equal(o1["label"], o2["label"])
    assert (o1["label"] != 255).all(), "a zoom-crop inside the patch never reaches the border"


@pytest.mark.parametrize(("augment", "message"), [
    ({"hflp": 0.5}, r"^dataset.augment.hflp is not a key of dataset.augment; did you mean dataset.augment.hflip\?$"),
    ({"ssr": 2}, r"^dataset.augment.ssr=2 must be a number from 0 to 1\.$"),
    ({"scale_range": [0.5, 2]}, r"^dataset.augment.scale_range=\[0.5,2\] must be a list of 2 numbers of at least 1"),
    ({"interpolation": "cubic"}, r"^dataset.augment.interpolation=cubic is not known; use linear or nearest\.$"),
    ({"copy_paste": {"classes": []}}, r"^dataset.augment.copy_paste.classes=\[\] must be a non-empty list"),
    ({"copy_paste": {"classes": [1], "max_instances": 0}}, r"^dataset.augment.copy_paste.max_instances=0 must be a "
                                                            r"positive integer\.$"),
])
def test_augment_keys_are_checked_with_the_config(augment: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_targets({"_target_": "segplat.data.DataModule", "name": "x", "layout": {}, "augment": augment},
                      root="dataset")


def test_build_augment_builds_what_the_keys_say() -> None:
    specs = {"rgb": ModalitySpec(("r", "g", "b"))}
    built = build_augment({"hflip": 0.25, "vflip": 0.5, "rot90": 0.5, "scale_range": [1.2, 2.0]}, specs, 7)
    assert isinstance(built, GeometricAugment)
    assert (built.hflip, tuple(built.scale_range), built.ignore_index) == (0.25, (1.2, 2.0), 7)
    with pytest.raises(ConfigError, match=r"scale_range=\[2,1.2\] must be \[lo, hi\] with lo <= hi"):
        build_augment({"scale_range": [2.0, 1.2]}, specs, 255)
    with pytest.raises(ConfigError, match="needs the training store"):
        build_augment({"copy_paste": {"classes": [1]}}, specs, 255)


class RecordingDonor:
    def __init__(self, donor: StoreDonor) -> None:
        self.donor, self.specs, self.last = donor, donor.specs, None

    def draw(self, rng, classes, tries=4):
        self.last = self.donor.draw(rng, classes, tries)
        return self.last


def test_copy_paste_moves_instances_in_every_modality(tmp_path: Path) -> None:
    layout = SyntheticClouds(num_train=4, num_val=1, scene_size=64)
    path = prepare_store(layout, tmp_path / "s.zarr", 64, progress=False)
    donor = RecordingDonor(StoreDonor(str(path), "train", ["rgb", "nir"], 32))
    cp = CopyPaste(donor, classes=[1, 2], p=1.0, max_instances=2, min_area=4)
    base = {"rgb": np.zeros((3, 32, 32), np.uint8), "nir": np.zeros((1, 32, 32), np.uint8),
            "label": np.zeros((32, 32), np.uint8)}
    pasted_any = False
    for seed in range(6):
        out = cp({k: v.copy() for k, v in base.items()}, np.random.default_rng(seed))
        changed = out["label"] != 0
        if donor.last is None or not changed.any():
            continue
        pasted_any = True
        assert set(np.unique(out["label"][changed])) <= {1, 2}
        for m in ("rgb", "nir"):
            np.testing.assert_array_equal(out[m][:, changed], donor.last[m][:, changed])
            assert (out[m][:, ~changed] == 0).all()
    assert pasted_any
    coarse = sample_mask(np.kron(np.eye(4, dtype=bool), np.ones((8, 8), bool)), (4, 4))
    np.testing.assert_array_equal(coarse, np.eye(4, dtype=bool))
    temporal = type("D", (), {"specs": {"s2": ModalitySpec(("b",), temporal=True, max_time=3)}})()
    with pytest.raises(ConfigError, match="temporal"):
        CopyPaste(temporal, classes=[1])


def test_datamodule_builds_copy_paste_from_config(tmp_path: Path) -> None:
    cfg = compose_train([*TINY, "+dataset.augment.copy_paste={classes:[1,2],p:1.0,min_area:4}",
                         "+dataset.augment.ssr=0.5"], output_dir=tmp_path)
    dm = instantiate(cfg.dataset)
    dm.setup()
    ds = dm.dataset("train", train=True)
    assert isinstance(ds.augment, Compose) and isinstance(ds.augment.transforms[0], CopyPaste)
    a, b = ds[0], ds[0]
    np.testing.assert_array_equal(a["label"], b["label"])  # the per-sample generator decides everything
    assert a["rgb"].shape == (3, 32, 32) and a["label"].dtype == np.uint8
