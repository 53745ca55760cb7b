"""sen1floods11: S1/S2/label GeoTIFF chips + split CSVs -> store (band selection, NaN/0 nodata, -1 labels,
georeferencing, Bolivia) -> one epoch; repackaged trees (.txt splits, S1GRDHand/S2L1CHand, uint16); bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segplat.data.fake.sen1floods11 import write_fake
from segplat.data.layouts.base import build_layout
from segplat.data.layouts.sen1floods11 import S2_BANDS, Sen1Floods11Layout
from segplat.data.store import PatchStore, prepare_store
from segplat.errors import ConfigError, DataError
from tests.data.conftest import assert_padding_invalid, assert_stats, prepared, scene_from_tiles, train_one_epoch

HAND = Path("v1.1/data/flood_events/HandLabeled")


@pytest.fixture(scope="module")
def s1f_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake(tmp_path_factory.mktemp("s1f"), seed=2)


def _read(path: str, bands: list[int] | None = None) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(bands)


@pytest.mark.slow
def test_store_keeps_bands_nodata_labels_and_georeferencing(s1f_root: Path) -> None:
    bands = ["B2", "B3", "B4", "B8"]
    _, store = prepared("sen1floods11", s1f_root, f"dataset.layout.output_bands=[{','.join(bands)}]")
    assert set(store.splits) == {"train", "val", "test", "bolivia"}
    mods = store.modalities
    assert mods["s2"].bands == tuple(bands) and mods["s2"].dtype == "int16" and mods["s2"].nodata == 0
    assert mods["s1"].bands == ("VV", "VH") and mods["s1"].dtype == "float32" and np.isnan(mods["s1"].nodata)
    assert not mods["s1"].optical and mods["s2"].optical
    assert store.classes == ["dry", "water"]
    assert all("Bolivia_" in m["source"] for m in store.tiles_meta("bolivia") if m)
    s2_vals, s1_vals = [], []
    for m in store.tiles_meta("train"):
        assert m["crs"] == "EPSG:4326" and len(m["transform"]) == 6
    sources = sorted({m["source"] for m in store.tiles_meta("train") if m})
    for lab_path in sources:
        s2_path = lab_path.replace("LabelHand", "S2Hand")
        s1_path = lab_path.replace("LabelHand", "S1Hand")
        s2 = _read(s2_path, [S2_BANDS.index(b) + 1 for b in bands])
        s1 = _read(s1_path)
        raw = _read(lab_path)[0]
        np.testing.assert_array_equal(scene_from_tiles(store, "train", lab_path, "s2"), s2)
        np.testing.assert_array_equal(scene_from_tiles(store, "train", lab_path, "s1"), s1)  # NaN == NaN here
        label = scene_from_tiles(store, "train", lab_path, "label")
        np.testing.assert_array_equal(label, np.where(raw == -1, 255, raw))
        valid = scene_from_tiles(store, "train", lab_path, "valid")
        has_data = ~np.isnan(s1).all(0) | (s2 != 0).any(0)
        np.testing.assert_array_equal(valid, has_data)
        with rasterio.open(lab_path) as src:
            for m in store.tiles_meta("train"):
                if m and m["source"] == lab_path:
                    assert tuple(m["transform"]) == pytest.approx(tuple(src.transform)[:6])
        s2_vals.append(s2[:, valid & (s2 != 0).all(0)])
        s1_vals.append(s1[:, valid & ~np.isnan(s1).any(0)])
    assert_padding_invalid(store, "train")
    assert_stats(store, "s2", np.concatenate(s2_vals, axis=1))
    assert_stats(store, "s1", np.concatenate(s1_vals, axis=1))


@pytest.mark.slow
def test_one_training_epoch(s1f_root: Path, tmp_path: Path) -> None:
    train_one_epoch("sen1floods11", s1f_root, tmp_path, "dataset.layout.output_bands=[B4,B3,B2,B8]")


def test_repackaged_tree_txt_splits_and_uint16(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "raw", seed=5, per_split={"train": 2, "val": 1, "test": 1, "bolivia": 1},
                      s2_dtype="uint16")
    hand = root / HAND
    (hand / "S1Hand").rename(hand / "S1GRDHand")
    (hand / "S2Hand").rename(hand / "S2L1CHand")
    split_dir = root / "v1.1/splits/flood_handlabeled"
    for csv in split_dir.glob("*.csv"):
        ids = [line.split(",")[0].replace("_S1Hand.tif", "") for line in csv.read_text().splitlines()]
        csv.with_suffix(".txt").write_text("\n".join(ids) + "\n")
        csv.unlink()
    layout = Sen1Floods11Layout(str(root), sensors=["s2"], output_bands=["B8A", "B12"])
    refs = layout.scan()
    assert {k: len(v) for k, v in refs.items()} == {"train": 2, "val": 1, "test": 1, "bolivia": 1}
    sample = layout.read(refs["train"][0])
    assert list(sample.arrays) == ["s2"] and sample.arrays["s2"].dtype == np.int16
    src = _read(refs["train"][0].files["s2"], [9, 13])
    np.testing.assert_array_equal(sample.arrays["s2"], src.astype(np.int16))
    assert sample.crs == "EPSG:4326"


def test_bad_input(s1f_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(s1f_root, root)
    hand = root / HAND
    chips = [p.name.replace("_LabelHand.tif", "") for p in sorted((hand / "LabelHand").iterdir())]
    train = [c for c in chips if c in (root / "v1.1/splits/flood_handlabeled/flood_train_data.csv").read_text()]
    (hand / "S2Hand" / f"{train[0]}_S2Hand.tif").unlink()                         # missing modality
    with rasterio.open(hand / "S2Hand" / f"{train[1]}_S2Hand.tif") as src:       # wrong band count
        profile, data = src.profile, src.read()
    profile.update(count=12)
    with rasterio.open(hand / "S2Hand" / f"{train[1]}_S2Hand.tif", "w", **profile) as dst:
        dst.write(data[:12])
    with rasterio.open(hand / "LabelHand" / f"{train[2]}_LabelHand.tif", "r+") as dst:  # label out of range
        lab = dst.read()
        lab[0, 0, 0] = 3
        dst.write(lab)
    (hand / "S1Hand" / f"{train[3]}_S1Hand.tif").write_bytes(b"II*\x00garbage")  # corrupt
    layout = Sen1Floods11Layout(str(root), splits=["train", "val"])
    store = PatchStore(prepare_store(layout, tmp_path / "s.zarr", 64, progress=False))
    joined = "\n".join(store.meta["skipped"])
    assert len(store.meta["skipped"]) == 4, joined
    assert f"{train[0]}_S2Hand.tif: the file is missing" in joined
    assert f"{train[1]}_S2Hand.tif: S2 has 12 bands" in joined
    assert f"{train[2]}_LabelHand.tif: label values [3]" in joined
    assert f"{train[3]}_S1Hand.tif: cannot be opened as a raster" in joined
    assert {m["source"] for m in store.tiles_meta("val") if m}  # the rest is written


def test_all_nodata_chip_is_skipped(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "raw", seed=3, per_split={"train": 2, "val": 1})
    hand = root / HAND
    chip = sorted((hand / "LabelHand").iterdir())[0].name.replace("_LabelHand.tif", "")
    for sub, fill in (("S1Hand", np.nan), ("S2Hand", 0)):
        with rasterio.open(hand / sub / f"{chip}_{sub}.tif", "r+") as dst:
            dst.write(np.full((dst.count, dst.height, dst.width), fill, dtype=dst.dtypes[0]))
    layout = Sen1Floods11Layout(str(root), splits=["train", "val"])
    store = PatchStore(prepare_store(layout, tmp_path / "s.zarr", 64, progress=False))
    assert any(chip in s and "no-data" in s for s in store.meta["skipped"]), store.meta["skipped"]


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="B13"):
        Sen1Floods11Layout(str(tmp_path), output_bands=["B2", "B13"])
    with pytest.raises(ConfigError, match=r"^dataset.layout.sensors=\[s3\] must be a non-empty list of one of "
                                          r"s[12], s[12]"):
        build_layout({"_target_": "segplat.data.layouts.sen1floods11.Sen1Floods11Layout", "sensors": ["s3"]},
                     str(tmp_path))
    with pytest.raises(ConfigError, match=r"^dataset.layout.splits=\[train,tset\] must be a list of one of"):
        build_layout({"_target_": "segplat.data.layouts.sen1floods11.Sen1Floods11Layout", "splits": ["train", "tset"]},
                     str(tmp_path))
    with pytest.raises(DataError, match="HandLabeled"):
        Sen1Floods11Layout(str(tmp_path)).scan()


def test_chip_grids_are_checked_and_bands_found_by_description(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "raw", seed=4, per_split={"train": 2, "val": 1})
    hand = root / HAND
    chip = sorted((hand / "LabelHand").iterdir())[0].name.replace("_LabelHand.tif", "")
    s1 = hand / "S1Hand" / f"{chip}_S1Hand.tif"
    with rasterio.open(s1) as src:
        profile, data = src.profile, src.read()
    profile.update(transform=profile["transform"] @ rasterio.Affine.translation(0, 3))  # 3 rows south
    with rasterio.open(s1, "w", **profile) as dst:
        dst.write(data)
    layout = Sen1Floods11Layout(str(root), splits=["train"])
    ref = next(r for r in layout.scan()["train"] if r.id == chip)
    with pytest.raises(DataError, match=rf"{chip}_S1Hand.tif and .*{chip}_LabelHand.tif are not on the same grid "
                                        r"\(origin .*: \+0.00 px across, \+3.00 px down\); set "
                                        r"dataset.layout.resample=true"):
        layout.read(ref)
    warped = Sen1Floods11Layout(str(root), splits=["train"], resample=True).read(ref).arrays["s1"]
    np.testing.assert_array_equal(warped[:, 3:], data[:, :-3])
    assert np.isnan(warped[:, :3]).all()
    # an S2 chip whose bands are described in another order: names are found by description
    s2 = hand / "S2Hand" / f"{chip}_S2Hand.tif"
    order = list(reversed(S2_BANDS))
    with rasterio.open(s2) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(s2, "w", **profile) as dst:
        dst.write(data[::-1])
        for k, name in enumerate(order):
            dst.set_band_description(k + 1, name)
    lay = Sen1Floods11Layout(str(root), sensors=["s2"], output_bands=["B8", 4], splits=["train"])
    assert lay.modalities["s2"].bands == ("B8", "B4")
    np.testing.assert_array_equal(lay.read(ref).arrays["s2"], data[[S2_BANDS.index("B8"), S2_BANDS.index("B4")]])
