"""geotiff: the user's own projected GeoTIFFs with nodata borders -> store (pixels, masks, georeferencing,
stats) -> one epoch; grids that differ (refused, or warped with resample=true); class tables and split files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from segplat.data.fake.geotiff import write_fake
from segplat.data.layouts.base import build_layout
from segplat.data.layouts.geotiff import GeoTiffLayout
from segplat.data.raster import write_geotiff
from segplat.data.store import PatchStore, prepare_store
from segplat.errors import ConfigError, DataError
from tests.data.conftest import assert_padding_invalid, assert_stats, prepared, scene_from_tiles, train_one_epoch

MODS = {"optical": {"glob": "*/optical/*.tif", "bands": ["red", "green", "blue", "nir"], "nodata": "file"},
        "sar": {"glob": "*/sar/*.tif", "bands": ["vv", "vh"], "nodata": "file", "optical": False}}
LABEL = {"glob": "*/label/*.tif"}
CLASSES = ["background", "water", "building"]


def layout(root: Path, **kw) -> GeoTiffLayout:
    """The layout as `dataset.layout` builds it: every key checked against the constructor's types first."""
    args = {"modalities": MODS, "label": LABEL, "classes": CLASSES, "splits": {"train": "train/*", "val": "val/*"}}
    return build_layout({"_target_": "segplat.data.layouts.geotiff.GeoTiffLayout", **args, **kw}, str(root))


@pytest.fixture(scope="module")
def gt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake(tmp_path_factory.mktemp("geotiff"), seed=7)


def test_pixels_masks_and_georeferencing_survive(gt_root: Path) -> None:
    _, store = prepared("geotiff", gt_root)
    mods = store.modalities
    assert mods["optical"].dtype == "uint16" and mods["optical"].nodata == 0
    assert mods["sar"].dtype == "float32" and np.isnan(mods["sar"].nodata) and not mods["sar"].optical
    assert store.classes == CLASSES and store.palette[1] == [0, 90, 255]
    opt_vals, sar_vals = [], []
    sources = sorted({m["source"] for m in store.tiles_meta("train") if m})
    assert len(sources) == 8 and all("/train/label/" in s for s in sources)
    for src in sources:
        with rasterio.open(src) as r:
            label, transform, crs = r.read(1), r.transform, r.crs
        opt = rasterio.open(src.replace("/label/", "/optical/")).read()
        sar = rasterio.open(src.replace("/label/", "/sar/")).read()
        np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "optical"), opt)
        np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "sar"), sar)
        np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "label"), label)
        valid = scene_from_tiles(store, "train", src, "valid")
        footprint = (opt != 0).any(0)
        assert not footprint.all()  # the fake has a nodata border ...
        np.testing.assert_array_equal(valid, footprint)  # ... and it is masked, not data
        assert (label[~footprint] == 255).all()
        # each tile's georeference: the stored scene transform + window give the tile's own grid, and a
        # windowed read there returns exactly the stored tile
        group = store.split("train")
        for i, m in enumerate(store.tiles_meta("train")):
            if not m or m["source"] != src:
                continue
            assert m["crs"] == crs.to_string() == "EPSG:32633"
            y, x, h, w = m["window"]
            tile_transform = rasterio.Affine(*m["transform"]) @ rasterio.Affine.translation(x, y)
            assert tile_transform.c == pytest.approx(transform.c + 10.0 * x)
            assert tile_transform.f == pytest.approx(transform.f - 10.0 * y)
            with rasterio.open(src.replace("/label/", "/optical/")) as r:
                win = rasterio.windows.from_bounds(*rasterio.transform.array_bounds(h, w, tile_transform),
                                                   transform=r.transform)
                np.testing.assert_array_equal(np.asarray(group["optical"][i])[:, :h, :w],
                                              r.read(window=Window(round(win.col_off), round(win.row_off), w, h)))
        opt_vals.append(opt[:, footprint])
        sar_vals.append(sar[:, footprint])
    assert_stats(store, "optical", np.concatenate(opt_vals, axis=1))
    assert_stats(store, "sar", np.concatenate(sar_vals, axis=1))
    assert_padding_invalid(store, "val")


@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_one_training_epoch(gt_root: Path, tmp_path: Path) -> None:
    train_one_epoch("geotiff", gt_root, tmp_path, "dataset.tile_size=64")


@pytest.mark.parametrize("kw,what", [({"sar_resolution": 20.0}, "pixel size 20x20 vs 10x10"),
                                     ({"sar_crs": "EPSG:32632"}, "CRS EPSG:32632 vs EPSG:32633")])
def test_other_grid_is_refused_unless_resampled(tmp_path: Path, kw: dict, what: str) -> None:
    root = write_fake(tmp_path / "raw", seed=8, per_split=1, **kw)
    with pytest.raises(DataError, match="every one of the 2 samples of dataset geotiff") as err:
        prepare_store(layout(root), tmp_path / "a.zarr", 64, progress=False)
    assert "are not on the same grid" in str(err.value) and what in str(err.value)
    assert "/sar/scene_00.tif" in str(err.value) and "/label/scene_00.tif" in str(err.value)
    assert "dataset.layout.resample=true" in str(err.value)
    assert not (tmp_path / "a.zarr.partial").exists() and not (tmp_path / "a.zarr").exists()
    store = PatchStore(prepare_store(layout(root, resample=True), tmp_path / "b.zarr", 64, progress=False))
    same = write_fake(tmp_path / "same", seed=8, per_split=1)  # the same scenes on the label grid
    src = next(m["source"] for m in store.tiles_meta("train") if m)
    warped = scene_from_tiles(store, "train", src, "sar")
    truth = rasterio.open(same / "train" / "sar" / "scene_00.tif").read()
    assert warped.shape == truth.shape
    both = np.isfinite(warped).all(0) & np.isfinite(truth).all(0)
    assert both.mean() > 0.7
    # bilinear resampling of a coarser grid: close to the truth on average, far from constant
    assert np.abs(warped[:, both] - truth[:, both]).mean() < 3.0
    assert np.corrcoef(warped[0, both], truth[0, both])[0, 1] > 0.8


def test_value_map_split_files_and_bad_input(tmp_path: Path) -> None:
    gt_root = write_fake(tmp_path / "fake", seed=7, per_split=3)  # train/ scene_00-02, val/ scene_03-05
    root = tmp_path / "raw"
    shutil.copytree(gt_root, root)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("scene_00\nscene_01\nscene_02\nscene_05\n")
    (root / "splits" / "val.txt").write_text("scene_03\nscene_04\n")
    # raw values 10 / 20 / 30 -> classes, 0 ignored
    for p in sorted(root.glob("*/label/*.tif")):
        with rasterio.open(p) as r:
            lab, profile = r.read(1), r.profile
        raw = np.select([lab == 0, lab == 1, lab == 2], [10, 20, 30], 0).astype(np.uint8)
        profile.update(nodata=None)
        with rasterio.open(p, "w", **profile) as dst:
            dst.write(raw[None])
    lay = layout(root, splits=None, split_files={"train": "splits/train.txt", "val": "splits/val.txt"},
                 value_map={10: 0, 20: 1, 30: 2, 0: "ignore"},
                 label={"folder": "*/label", "pattern": "scene_*.tif"})  # folder + pattern instead of a glob
    refs = lay.scan()
    assert [r.id for r in refs["train"]] == ["scene_00", "scene_01", "scene_02", "scene_05"]
    sample = lay.read(refs["train"][0])
    truth = rasterio.open(gt_root / "train" / "label" / "scene_00.tif").read(1)
    np.testing.assert_array_equal(sample.label, truth)
    # bad input: a missing modality, a wrong band count, an unmapped label value, a corrupt file
    (root / "train" / "sar" / "scene_01.tif").unlink()
    with rasterio.open(root / "train" / "optical" / "scene_02.tif") as r:
        data, profile = r.read(), r.profile
    profile.update(count=3)
    with rasterio.open(root / "train" / "optical" / "scene_02.tif", "w", **profile) as dst:
        dst.write(data[:3])
    with rasterio.open(root / "val" / "label" / "scene_03.tif", "r+") as dst:
        lab = dst.read()
        lab[0, 5, 5] = 77
        dst.write(lab)
    (root / "val" / "optical" / "scene_04.tif").write_bytes(b"\x00" * 64)
    store = PatchStore(prepare_store(lay, tmp_path / "s.zarr", 64, progress=False))
    joined = "\n".join(store.meta["skipped"])
    assert len(store.meta["skipped"]) == 4, joined
    assert "scene_01.tif: sample scene_01 has no sar file" in joined
    assert "optical/scene_02.tif: optical has 3 bands" in joined
    assert "label/scene_03.tif: label values [77] are not in dataset.layout.value_map" in joined
    assert "optical/scene_04.tif: cannot be" in joined
    assert {m["source"] for m in store.tiles_meta("train") if m} == {str(root / "train/label/scene_00.tif"),
                                                                     str(root / "val/label/scene_05.tif")}


def test_label_classes_out_of_range_and_config_errors(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    t = rasterio.transform.from_origin(500_000, 5_000_000, 10, 10)
    write_geotiff(root / "train" / "optical" / "a.tif", np.ones((4, 20, 30), np.uint16), "EPSG:32633", t, nodata=0)
    write_geotiff(root / "train" / "sar" / "a.tif", np.ones((2, 20, 30), np.float32), "EPSG:32633", t)
    write_geotiff(root / "train" / "label" / "a.tif", np.full((1, 20, 30), 5, np.uint8), "EPSG:32633", t)
    lay = layout(root)
    with pytest.raises(DataError, match=r"a.tif: label values \[5\] are outside the 3 classes"):
        lay.read(lay.scan()["train"][0])
    with pytest.raises(ConfigError, match="classes"):
        layout(root, classes=[])
    with pytest.raises(ConfigError, match="palette"):
        layout(root, palette=[[0, 0, 0]])
    with pytest.raises(ConfigError, match="stem_regex"):
        layout(root, stem_regex="(")
    with pytest.raises(DataError, match="no files match optical glob"):
        layout(tmp_path / "empty").scan()
    bad_nodata = {**MODS, "optical": {**MODS["optical"], "nodata": "abc"}}
    with pytest.raises(ConfigError, match=r"^dataset\.layout\.modalities\.optical\.nodata=abc must be a number .*; a "
                                          r"number, \.nan, null \(none\) or file"):
        layout(root, modalities=bad_nodata)
    with pytest.raises(ConfigError, match=r"^dataset\.layout\.label\.nodata=none must be a number"):
        layout(root, label={**LABEL, "nodata": "none"})


def test_a_config_key_refused_by_the_first_samples_stops_the_prepare(tmp_path: Path, caplog) -> None:
    """source_bands naming a band no file has was one warning per sample, then the same error after a full pass."""
    root = write_fake(tmp_path / "fake", seed=7, per_split=4)
    fifth = {"x": {"glob": "*/optical/*.tif", "bands": ["x"], "source_bands": [5]}}  # the files have 4 bands
    with caplog.at_level("WARNING"), pytest.raises(DataError, match=r"^the first 5 samples of dataset geotiff were "
                                                   r"all refused for the same reason, which names a config key; "
                                                   r"stopped before reading the rest: .*source_bands asks for band 5"):
        prepare_store(layout(root, modalities=fifth), tmp_path / "s.zarr", 64, progress=False)
    assert sum(r.getMessage().startswith("skipped: ") for r in caplog.records) == 5  # of 8 samples
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.partial").exists()
    # once one sample has been read, a refusal is that file's: it is skipped and the rest are still read
    first = sorted(root.glob("train/optical/*.tif"))[0]
    with rasterio.open(first) as src:
        data, profile = src.read(), src.profile
    with rasterio.open(first, "w", **{**profile, "count": 5}) as dst:
        dst.write(np.concatenate([data, data[:1]]))
    store = PatchStore(prepare_store(layout(root, modalities=fifth), tmp_path / "s.zarr", 64, progress=False))
    assert len(store.meta["skipped"]) == 7
    assert {m["source"] for m in store.tiles_meta("train") if m} == {str(root / "train/label/scene_00.tif")}


def test_crops_stay_on_the_scene_and_validation_scores_each_pixel_once(tmp_path: Path) -> None:
    """Training crops were drawn anywhere in a tile, so a border tile gave crops of padding only (all ignore: a
    zero loss averaged in); validation windows overlapped when the patch did not divide the tile, scoring the
    shared rows twice, and covered padding-only windows."""
    from segplat.data.dataset import PatchDataset

    t = rasterio.transform.from_origin(500_000, 5_000_000, 10, 10)
    labels = np.random.default_rng(0).integers(0, 3, (1, 70, 100), dtype=np.uint8)
    write_geotiff(tmp_path / "raw/train/optical/a.tif", np.ones((1, 70, 100), np.uint16), "EPSG:32633", t)
    write_geotiff(tmp_path / "raw/train/label/a.tif", labels, "EPSG:32633", t)
    lay = layout(tmp_path / "raw", modalities={"optical": {"glob": "*/optical/*.tif", "bands": ["x"]}},
                 splits={"train": "train/*"})
    store = prepare_store(lay, tmp_path / "s.zarr", 64, progress=False)  # tiles 64x64, 64x36, 6x64, 6x36
    scene_part = {i: m["window"][2:] for i, m in enumerate(PatchStore(store).tiles_meta("train"))}  # rows, columns
    train = PatchDataset(store, "train", 24, train=True, patches_per_tile=20)
    for i in range(len(train)):
        sample = train[i]
        tile, (y, x) = int(sample["tile"]), sample["offset"]
        height, width = scene_part[tile]
        assert (y == 0 if height < 24 else y + 24 <= height) and x + 24 <= width, (tile, y, x)
        rows = min(height, 24)  # a 6-row tile is cropped whole: its 6 rows, then padding
        assert (sample["label"][:rows] != 255).all() and (sample["label"][rows:] == 255).all()
    val = PatchDataset(store, "train", 24, train=False)  # the validation grid, here over the train split
    counts = np.zeros(3, np.int64)
    for i in range(len(val)):
        lab = val[i]["label"]
        counts += np.bincount(lab[lab != 255], minlength=3)
    np.testing.assert_array_equal(counts, np.bincount(labels.ravel(), minlength=3))  # every pixel once
