"""Geodata rules on rasters written in real formats (docs/geodata.md): pixels of different ground are
never paired. Shifted origins, other CRSs (UTM, EPSG:3857, EPSG:4326), non-overlapping extents, nodata borders,
multi-band files with band descriptions, label nodata tags, unknown config keys, unreadable and dead inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hydra.utils import instantiate
from rasterio.transform import from_origin

from segplat.data.layouts.base import build_layout
from segplat.data.layouts.geotiff import GeoTiffLayout
from segplat.data.raster import Grid, grid_difference, write_geotiff
from segplat.data.store import PatchStore, prepare_store
from segplat.errors import ConfigError, DataError
from segplat.schema import HYDRA_KEYS, check_targets, signature_of
from tests.conftest import compose_train
from tests.data.conftest import scene_from_tiles

UTM = "EPSG:32633"
GEOTIFF = "segplat.data.layouts.geotiff.GeoTiffLayout"
PX = 30.0  # Landsat pixels
X0, Y0 = 500_010.0, 5_300_020.0
H, W = 40, 70
CLASSES = ["background", "water", "building"]


def ground_value(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A value that belongs to the ground (label-grid row/col), so any misregistration shows."""
    return (1000 + 7 * rows + 3 * cols).astype(np.uint16)


def label_map() -> np.ndarray:
    lab = (np.arange(W)[None, :] // 25 + np.arange(H)[:, None] // 20) % 3
    lab = lab.astype(np.uint8)
    lab[:, :4] = 255  # a nodata border, as at a scene edge
    return lab


def write_scene(root: Path, name: str, split: str = "train", shift_cols: float = 0.0, optical_crs: str = UTM,
                optical_origin: tuple[float, float] | None = None, label_nodata: float | None = 255) -> None:
    """label + 4-band optical (uint16, nodata 0) of one scene; the optical grid starts `shift_cols` pixels east."""
    t = from_origin(X0, Y0, PX, PX)
    write_geotiff(root / split / "label" / f"{name}.tif", label_map()[None], UTM, t, nodata=label_nodata)
    ox, oy = optical_origin or (X0 + shift_cols * PX, Y0)
    rows, cols = np.mgrid[0:H, 0:W]
    ground = ground_value(rows, cols + round(shift_cols))
    opt = np.stack([ground, ground + 1, ground + 2, ground + 3])
    opt[:, :, :3] = 0  # the optical swath's own nodata border
    write_geotiff(root / split / "optical" / f"{name}.tif", opt, optical_crs, from_origin(ox, oy, PX, PX), nodata=0,
                  descriptions=["red", "green", "blue", "nir"])


def layout(root: Path, modalities: dict | None = None, **kw) -> GeoTiffLayout:
    """The layout as `dataset.layout` builds it: every key checked against the constructor's types first."""
    mods = modalities or {"optical": {"glob": "*/optical/*.tif", "bands": ["red", "green", "blue", "nir"]}}
    return build_layout({"_target_": GEOTIFF, "modalities": mods, "label": {"glob": "*/label/*.tif"},
                         "classes": CLASSES, "splits": {"train": "train/*", "val": "val/*"}, **kw}, str(root))


def test_grid_difference_tolerates_a_fraction_of_a_pixel_only() -> None:
    ref = Grid(rasterio.crs.CRS.from_string(UTM), from_origin(X0, Y0, PX, PX), H, W)
    same = Grid(ref.crs, from_origin(X0 + 0.001 * PX, Y0 - 0.002 * PX, PX, PX), H, W)
    assert grid_difference(same, ref) is None
    half = Grid(ref.crs, from_origin(X0 + 0.5 * PX, Y0, PX, PX), H, W)
    assert grid_difference(half, ref) == f"origin ({X0 + 15:.10g}, {Y0:.10g}) vs ({X0:.10g}, {Y0:.10g}): " \
                                         "+0.50 px across, +0.00 px down"
    finer = Grid(ref.crs, from_origin(X0, Y0, PX * (1 + 1e-3), PX), H, W)  # 0.07 px drift over 70 columns
    assert "pixel size" in grid_difference(finer, ref)
    assert "px vs" in grid_difference(Grid(ref.crs, ref.transform, H, W + 1), ref)
    assert grid_difference(
        Grid(rasterio.crs.CRS.from_epsg(3857), ref.transform, H, W), ref) == "CRS EPSG:3857 vs EPSG:32633"


def test_shifted_origin_is_refused_naming_both_files_then_warped_onto_the_label(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    write_scene(root, "a", shift_cols=50)
    write_scene(root, "b", "val")
    lay = layout(root)
    ref = lay.scan()["train"][0]
    with pytest.raises(DataError) as err:
        lay.read(ref)
    msg = str(err.value)
    assert msg.startswith(f"{root}/train/optical/a.tif and {root}/train/label/a.tif are not on the same grid")
    assert f"origin ({X0 + 50 * PX:.10g}, {Y0:.10g}) vs ({X0:.10g}, {Y0:.10g}): +50.00 px across" in msg
    assert "set dataset.layout.resample=true to warp" in msg
    # resample=true: the optical pixels land on the label's ground; left of the optical swath is no data
    store = PatchStore(prepare_store(layout(root, resample=True), tmp_path / "s.zarr", 64, progress=False))
    src = f"{root}/train/label/a.tif"
    opt = scene_from_tiles(store, "train", src, "optical")
    valid = scene_from_tiles(store, "train", src, "valid")
    rows, cols = np.mgrid[0:H, 0:W]
    inside = cols >= 53  # 50 px shift + the optical file's own 3 px nodata border
    np.testing.assert_array_equal(opt[0][inside], ground_value(rows, cols)[inside])
    assert (opt[:, ~inside] == 0).all() and not valid[~inside].any() and valid[inside].all()
    label = scene_from_tiles(store, "train", src, "label")
    assert (label[~inside] == 255).all()  # no data under the label: not trained on
    assert store.meta["skipped"] == []


def test_a_sub_tolerance_offset_is_the_same_grid(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    write_scene(root, "a", optical_origin=(X0 + 0.002 * PX, Y0 - 0.001 * PX))  # float noise, not a shift
    sample = layout(root).read(layout(root).scan()["train"][0])
    np.testing.assert_array_equal(sample.arrays["optical"][0, :, 3:], ground_value(*np.mgrid[0:H, 3:W]))


def test_non_overlapping_modality_skips_its_sample_and_all_skipped_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    write_scene(root, "a")
    write_scene(root, "far", optical_origin=(X0 + 100_000, Y0))  # 100 km east: no overlap
    write_scene(root, "v", "val")
    store = PatchStore(prepare_store(layout(root, resample=True), tmp_path / "s.zarr", 64, progress=False))
    (reason,) = store.meta["skipped"]
    assert reason.startswith(f"{root}/train/optical/far.tif: optical does not overlap {root}/train/label/far.tif")
    assert "the sample was skipped" in reason
    assert {m["source"] for m in store.tiles_meta("train") if m} == {f"{root}/train/label/a.tif"}
    # every sample dead: one sentence, and no .partial folder left behind
    only_far = tmp_path / "far"
    write_scene(only_far, "far", optical_origin=(X0 + 100_000, Y0))
    with pytest.raises(DataError, match=r"^every one of the 1 samples of dataset geotiff under .* was skipped") as err:
        prepare_store(layout(only_far, resample=True), tmp_path / "t.zarr", 64, progress=False)
    assert "does not overlap" in str(err.value) and str(err.value).count("\n") == 0
    assert not (tmp_path / "t.zarr.partial").exists() and not (tmp_path / "t.zarr").exists()


def test_a_band_without_valid_pixels_in_train_stops_prepare(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for name in ("a", "b"):
        write_scene(root, name)
        with rasterio.open(root / "train" / "optical" / f"{name}.tif", "r+") as dst:
            dst.write(np.zeros((H, W), np.uint16), 4)  # nir is nodata (0) everywhere
    write_scene(root, "v", "val")
    with pytest.raises(DataError, match=r"^optical has no valid pixel in the whole train split \(band nir: every"):
        prepare_store(layout(root), tmp_path / "s.zarr", 64, progress=False)
    assert not (tmp_path / "s.zarr.partial").exists()


def test_all_nodata_modality_names_its_own_file(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    write_scene(root, "a")
    write_scene(root, "b")
    t = from_origin(X0, Y0, PX, PX)
    write_geotiff(root / "train" / "sar" / "a.tif", np.full((2, H, W), np.nan, np.float32), UTM, t, nodata=np.nan)
    write_geotiff(root / "train" / "sar" / "b.tif", np.ones((2, H, W), np.float32), UTM, t, nodata=np.nan)
    mods = {"optical": {"glob": "*/optical/*.tif", "bands": ["r", "g", "b", "n"]},
            "sar": {"glob": "*/sar/*.tif", "bands": ["vv", "vh"], "optical": False}}
    store = PatchStore(prepare_store(layout(root, mods), tmp_path / "s.zarr", 64, progress=False))
    assert store.meta["skipped"] == [f"{root}/train/sar/a.tif: every pixel of sar is no-data in this sample, so the "
                                     "sample was skipped (replace the file or remove the sample)."]


def _inverse_mercator(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EPSG:3857 metres -> WGS84 lon/lat (closed form on the sphere of radius 6378137 m, as EPSG:3857 defines)."""
    r = 6378137.0
    return np.degrees(x / r), np.degrees(2 * np.arctan(np.exp(y / r)) - math.pi / 2)


def test_reprojection_from_epsg4326_onto_an_epsg3857_label_matches_the_closed_form(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    # the label grid: EPSG:3857, 20 m pixels around 15.3 E, 47.6 N
    x0, y0, px, h, w = 1_703_200.0, 6_040_300.0, 20.0, 48, 64
    write_geotiff(root / "train" / "label" / "s.tif", np.zeros((1, h, w), np.uint8), "EPSG:3857",
                  from_origin(x0, y0, px, px))
    # the image: EPSG:4326 covering the label with a margin; value = a linear function of lon/lat
    lon0, lat1 = _inverse_mercator(np.array([x0 - 400]), np.array([y0 + 400]))
    lon1, lat0 = _inverse_mercator(np.array([x0 + px * w + 400]), np.array([y0 - px * h - 400]))
    ih, iw = 90, 110
    dlon, dlat = (lon1[0] - lon0[0]) / iw, (lat1[0] - lat0[0]) / ih
    lon = lon0[0] + dlon * (np.arange(iw) + 0.5)
    lat = lat1[0] - dlat * (np.arange(ih) + 0.5)

    def f(lo: np.ndarray, la: np.ndarray) -> np.ndarray:
        return (lo - 15.0) * 1000.0 + (la - 47.0) * 2000.0

    write_geotiff(root / "train" / "image" / "s.tif", f(lon[None, :], lat[:, None])[None].astype(np.float32),
                  "EPSG:4326", from_origin(lon0[0], lat1[0], dlon, dlat), nodata=np.nan)
    mods = {"image": {"glob": "*/image/*.tif", "bands": ["v"], "optical": False}}
    lay = GeoTiffLayout(str(root), modalities=mods, label={"glob": "*/label/*.tif"}, classes=["a"],
                        splits={"train": "train/*"})
    with pytest.raises(DataError, match=r"not on the same grid \(CRS EPSG:4326 vs EPSG:3857\)"):
        lay.read(lay.scan()["train"][0])
    lay = GeoTiffLayout(str(root), modalities=mods, label={"glob": "*/label/*.tif"}, classes=["a"],
                        splits={"train": "train/*"}, resample=True)
    sample = lay.read(lay.scan()["train"][0])
    xs = x0 + px * (np.arange(w) + 0.5)
    ys = y0 - px * (np.arange(h) + 0.5)
    lo, la = _inverse_mercator(xs[None, :], ys[:, None])
    truth = f(lo, la)
    got = sample.arrays["image"][0]
    assert got.shape == (h, w) and np.isfinite(got).all()
    # bilinear interpolation of a linear function: exact up to the projection's curvature inside one pixel
    np.testing.assert_allclose(got, truth, atol=1e-3 * (truth.max() - truth.min()))
    assert sample.crs == "EPSG:3857" and sample.transform[:3] == (px, 0.0, x0)


def test_label_nodata_null_means_the_files_tag(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    write_scene(root, "a", label_nodata=None)
    lab = label_map()
    lab[lab == 255] = 7
    write_geotiff(root / "train" / "label" / "a.tif", lab[None], UTM, from_origin(X0, Y0, PX, PX), nodata=7)
    ref = layout(root).scan()["train"][0]
    for nodata in (None, "file"):
        lay = GeoTiffLayout(str(root), modalities={"optical": {"glob": "*/optical/*.tif", "bands": list("rgbn")}},
                            label={"glob": "*/label/*.tif", "nodata": nodata}, classes=CLASSES,
                            splits={"train": "train/*"})
        label = lay.read(ref).label
        np.testing.assert_array_equal(label == 255, lab == 7)
        np.testing.assert_array_equal(label[lab != 7], lab[lab != 7])
    lay = GeoTiffLayout(str(root), modalities={"optical": {"glob": "*/optical/*.tif", "bands": list("rgbn")}},
                        label={"glob": "*/label/*.tif", "nodata": 2}, classes=CLASSES, splits={"train": "train/*"})
    with pytest.raises(DataError, match=r"label values \[7\] are outside the 3 classes"):
        lay.read(ref)  # an explicit value replaces the tag


def test_one_multiband_file_feeds_two_modalities_by_description_and_index(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    write_scene(root, "a")
    write_scene(root, "b", "val")
    mods = {"rgb": {"glob": "*/optical/*.tif", "bands": ["r", "g", "b"], "source_bands": ["red", "green", "blue"]},
            "nir": {"glob": "*/optical/*.tif", "bands": ["nir"], "source_bands": [4], "optical": False}}
    store = PatchStore(prepare_store(layout(root, mods), tmp_path / "s.zarr", 64, progress=False))
    src = f"{root}/train/label/a.tif"
    with rasterio.open(root / "train" / "optical" / "a.tif") as f:
        pixels = f.read()
    np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "rgb"), pixels[:3])
    np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "nir"), pixels[3:])
    assert store.modalities["rgb"].bands == ("r", "g", "b") and store.modalities["nir"].nodata == 0
    bad = layout(root, {"x": {"glob": "*/optical/*.tif", "bands": ["x"], "source_bands": [5]}})
    with pytest.raises(DataError, match=r"optical/a.tif: dataset.layout.modalities.x.source_bands asks for band 5 "
                                        r"but the file has 4 band\(s\)"):
        bad.read(bad.scan()["train"][0])
    bad = layout(root, {"x": {"glob": "*/optical/*.tif", "bands": ["x"], "source_bands": ["swir1"]}})
    with pytest.raises(DataError, match="asks for the band 'swir1' but the file's bands are described as red, green, "
                                        "blue, nir"):
        bad.read(bad.scan()["train"][0])
    with pytest.raises(ConfigError, match="one 1-based band index or band description per name"):
        layout(root, {"x": {"glob": "*/optical/*.tif", "bands": ["x", "y"], "source_bands": [1]}})
    with pytest.raises(ConfigError, match=r"^dataset\.layout\.modalities\.x\.source_bands=\[0\] must be a list of "):
        layout(root, {"x": {"glob": "*/optical/*.tif", "bands": ["x"], "source_bands": [0]}})


def test_unknown_keys_are_refused_before_any_read(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "does-not-exist")
    mods = {"optical": {"glob": "*.tif", "bands": ["a"], "band_indices": [1]}}
    with pytest.raises(ConfigError, match=r"^dataset.layout.modalities.optical.band_indices is not a key of "
                                          r"dataset.layout.modalities.optical; its keys are bands, dtype"):
        build_layout({"_target_": GEOTIFF, "modalities": mods, "classes": ["a"]}, nowhere)
    with pytest.raises(ConfigError, match=r"^dataset.layout.label.no_data is not a key of dataset.layout.label; did "
                                          r"you mean dataset.layout.label.nodata\?"):
        build_layout({"_target_": GEOTIFF, "modalities": {"o": {"glob": "*.tif", "bands": ["a"]}},
                      "label": {"no_data": 0}, "classes": ["a"]}, nowhere)
    cfg = compose_train(["dataset=geotiff", f"dataset.root={tmp_path}", "+dataset.layout.band_indices=[1]"])
    with pytest.raises(ConfigError, match=r"^dataset.layout.band_indices is not a key of dataset.layout; its keys "
                                          r"are classes, ignore_index, label, modalities"):
        instantiate(cfg.dataset).build_layout()
    with pytest.raises(ConfigError, match=r"^dataset.layout.output_band is not a key of dataset.layout; did you mean "
                                          r"dataset.layout.output_bands\?"):
        build_layout({"_target_": "segplat.data.layouts.sen1floods11.Sen1Floods11Layout", "output_band": ["B2"]},
                     nowhere)
    with pytest.raises(ConfigError, match=r"dataset.layout.max_time.s3 is not a key"):
        build_layout({"_target_": "segplat.data.layouts.s1s2_series.S1S2SeriesLayout", "max_time": {"s3": 4}},
                     nowhere)
    with pytest.raises(ConfigError, match=r"^dataset.layout.root is not a key of dataset.layout; .*\(the data's "
                                          r"folder is dataset.root\)"):
        build_layout({"_target_": "segplat.data.synthetic.SyntheticClouds", "root": "x"}, nowhere)


@pytest.mark.parametrize("name", ["clouds", "sen1floods11", "vaihingen", "potsdam", "geotiff", "airquality",
                                  "s1s2_series", "synthetic"])
def test_each_dataset_config_lists_exactly_its_layouts_keys(name: str) -> None:
    cfg = compose_train([f"dataset={name}"]).dataset.layout
    check_targets(cfg, root="dataset.layout")
    takes = [k for k in signature_of(cfg._target_).params if k != "root"]
    assert sorted(k for k in cfg if k not in HYDRA_KEYS) == sorted(takes)


def test_unreadable_first_file_is_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for name in ("a", "b", "c"):
        write_scene(root, name)
    write_scene(root, "v", "val")
    (root / "train" / "optical" / "a.tif").write_bytes(b"II*\x00 not a tiff")
    lay = layout(root, {"optical": {"glob": "*/optical/*.tif", "bands": list("rgbn")}})
    store = PatchStore(prepare_store(lay, tmp_path / "s.zarr", 64, progress=False))
    assert store.modalities["optical"].dtype == "uint16" and store.modalities["optical"].nodata == 0
    (reason,) = store.meta["skipped"]
    assert reason.startswith(f"{root}/train/optical/a.tif: cannot be")
    assert len({m["source"] for m in store.tiles_meta("train") if m}) == 2


def test_prediction_inputs_are_checked_on_the_full_grid(tmp_path: Path) -> None:
    """`segplat.predict` pairs the modalities of a scene by the same rule (a 0.4 px shift used to pass)."""
    from types import SimpleNamespace

    from segplat.data.layouts.base import ModalitySpec
    from segplat.predict.scenes import check_scene_alignment, header

    def read_geotiff(path: Path) -> tuple[None, dict]:
        with rasterio.open(path) as src:
            return None, header(src)

    t = from_origin(X0, Y0, PX, PX)
    write_geotiff(tmp_path / "rgb.tif", np.ones((3, H, W), np.uint8), UTM, t)
    write_geotiff(tmp_path / "nir.tif", np.ones((1, H, W), np.uint8), UTM, from_origin(X0 + 0.4 * PX, Y0, PX, PX))
    coarse = from_origin(X0, Y0, 2 * PX, 2 * PX)
    write_geotiff(tmp_path / "air.tif", np.ones((2, H // 2, W // 2), np.float32), UTM, coarse)
    specs = {"rgb": ModalitySpec(("r", "g", "b")), "nir": ModalitySpec(("n",)),
             "air": ModalitySpec(("a", "b"), dtype="float32", scale=0.5)}
    loaded = SimpleNamespace(modalities=["rgb", "nir"], specs=specs)
    profiles = {m: read_geotiff(tmp_path / f"{m}.tif")[1] for m in ("rgb", "nir")}
    with pytest.raises(DataError, match=r"nir.tif and .*rgb.tif are not on the same grid \(origin .*: \+0.40 px "
                                        r"across, \+0.00 px down\); warp the first onto the grid of the second"):
        check_scene_alignment(profiles, loaded)
    loaded = SimpleNamespace(modalities=["rgb", "air"], specs=specs)
    check_scene_alignment({m: read_geotiff(tmp_path / f"{m}.tif")[1] for m in ("rgb", "air")}, loaded)  # nested grid


def test_keys_that_would_not_take_effect_are_refused(tmp_path: Path) -> None:
    mods = {"o": {"glob": "*.tif", "bands": ["a"]}}
    with pytest.raises(ConfigError, match=r"label\.colour=true reads bands 1-3"):
        GeoTiffLayout(str(tmp_path), modalities=mods, label={"colour": True, "band": 2}, classes=["a"])
    with pytest.raises(ConfigError, match="tolerance and ignore_colours apply to colour labels only"):
        GeoTiffLayout(str(tmp_path), modalities=mods, label={"tolerance": 8}, classes=["a"])
    with pytest.raises(ConfigError, match=r"splits and dataset\.layout\.split_files are both set"):
        GeoTiffLayout(str(tmp_path), modalities=mods, classes=["a"], splits={"train": "*"},
                      split_files={"train": "t.txt"})
