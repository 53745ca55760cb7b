"""vaihingen / potsdam: ISPRS tiles -> store (colour labels, eroded labels, DSM/nDSM, splits, known defects,
georeferencing) -> one epoch each; bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segplat.data.fake.isprs import write_fake_potsdam, write_fake_vaihingen
from segplat.data.layouts.base import build_layout
from segplat.data.layouts.isprs import PALETTE, PotsdamLayout, VaihingenLayout
from segplat.data.store import PatchStore, prepare_store
from segplat.errors import ConfigError, DataError
from tests.data.conftest import assert_padding_invalid, assert_stats, prepared, scene_from_tiles, train_one_epoch


def _read(path: Path | str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _decode(colour: np.ndarray, black_ignore: bool = False) -> np.ndarray:
    out = np.full(colour.shape[1:], 254, np.uint8)
    for k, c in enumerate(PALETTE):
        out[(colour == np.array(c)[:, None, None]).all(0)] = k
    if black_ignore:
        out[(colour == 0).all(0)] = 255
    return out


@pytest.fixture(scope="module")
def vaihingen_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_vaihingen(tmp_path_factory.mktemp("vaihingen"), seed=4)


@pytest.fixture(scope="module")
def potsdam_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_potsdam(tmp_path_factory.mktemp("potsdam"), seed=6)


def test_vaihingen_store(vaihingen_root: Path) -> None:
    _, store = prepared("vaihingen", vaihingen_root)
    assert store.classes[0] == "impervious_surfaces" and store.classes[5] == "clutter" and len(store.classes) == 6
    assert store.palette == [list(c) for c in PALETTE]
    mods = store.modalities
    assert mods["image"].bands == ("nir", "red", "green") and mods["dsm"].dtype == "float32"
    assert not mods["dsm"].optical
    names = {s: {Path(m["source"]).name for m in store.tiles_meta(s) if m} for s in ("train", "val", "test")}
    assert names["train"] == {f"top_mosaic_09cm_area{i}.tif" for i in (1, 3, 5, 11, 13)}
    assert names["val"] == {f"top_mosaic_09cm_area{i}.tif" for i in (7, 37)}  # held out of train by the config
    assert names["test"] == {f"top_mosaic_09cm_area{i}.tif" for i in (2, 4)}
    assert any("not under" in n for n in store.meta["notes"])
    dsm_px = []
    for src in sorted({m["source"] for m in store.tiles_meta("train") if m}):
        tid = src.split("area")[-1].split(".")[0]
        np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "image"), _read(src))
        dsm = _read(vaihingen_root / "dsm" / f"dsm_09cm_matching_area{tid}.tif")
        np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "dsm"), dsm)
        colour = _read(vaihingen_root / "gts_for_participants" / f"top_mosaic_09cm_area{tid}.tif")
        np.testing.assert_array_equal(scene_from_tiles(store, "train", src, "label"), _decode(colour))
        dsm_px.append(dsm.reshape(1, -1))
        with rasterio.open(src) as r:
            metas = [m for m in store.tiles_meta("train") if m and m["source"] == src]
            assert all(m["crs"] == "EPSG:32632" for m in metas)
            assert all(tuple(m["transform"]) == pytest.approx(tuple(r.transform)[:6]) for m in metas)
    assert_stats(store, "dsm", np.concatenate(dsm_px, axis=1))
    assert_padding_invalid(store, "test")


def test_vaihingen_options_eroded_ndsm_ms2mnet_labels_at_root(tmp_path: Path) -> None:
    root = write_fake_vaihingen(tmp_path / "v", seed=1, ids=("1", "5", "15"), labels_at_root=True)
    layout = VaihingenLayout(str(root), elevation="ndsm", eroded=True, split="ms2mnet")
    refs = layout.scan()
    assert [r.id for r in refs["train"]] == ["1"] and [r.id for r in refs["test"]] == ["5", "15"]
    assert layout.modalities["dsm"].bands == ("ndsm",) and layout.modalities["dsm"].dtype == "uint8"
    sample = layout.read(refs["train"][0])
    eroded = _read(root / "gts_eroded_for_participants" / "top_mosaic_09cm_area1_noBoundary.tif")
    np.testing.assert_array_equal(sample.label, _decode(eroded, black_ignore=True))
    assert (sample.label == 255).any()  # boundaries are ignored
    assert sample.arrays["dsm"].dtype == np.uint8 and sample.arrays["dsm"].shape == (1, *sample.label.shape)
    full = VaihingenLayout(str(root), elevation="none")
    ref = full.scan()["train"][0]
    assert Path(ref.files["label"]).parent == root  # label archive unpacked at the root
    assert list(full.read(ref).arrays) == ["image"]


def test_potsdam_store_and_known_defects(potsdam_root: Path) -> None:
    _, store = prepared("potsdam", potsdam_root, "dataset.layout.image=rgbir")
    assert store.modalities["image"].bands == ("red", "green", "blue", "nir")
    test_ids = {Path(m["source"]).name for m in store.tiles_meta("test") if m}
    assert test_ids == {"top_potsdam_3_13_RGBIR.tif", "top_potsdam_5_15_RGBIR.tif"}
    notes = "\n".join(store.meta["notes"])
    assert "dsm_potsdam_03_13.tif" in notes and "1 column(s)" in notes
    assert "top_potsdam_2_10_label.tif: 6 off-palette" in notes
    src = next(m["source"] for m in store.tiles_meta("test") if m and "3_13" in m["source"])
    dsm = _read(potsdam_root / "1_DSM" / "dsm_potsdam_03_13.tif")[0]
    stored = scene_from_tiles(store, "test", src, "dsm")[0]
    assert stored.shape[1] == dsm.shape[1] + 1
    np.testing.assert_array_equal(stored[:, :-1], dsm)
    np.testing.assert_array_equal(stored[:, -1], dsm[:, -1])  # edge-replicated
    src = next(m["source"] for m in store.tiles_meta("train") if m and "2_10" in m["source"])
    label = scene_from_tiles(store, "train", src, "label")
    assert (label[:2, :3] == 4).all()  # (252, 255, 0) -> car
    assert_padding_invalid(store, "train")


def test_potsdam_irrg_ndsm_eroded(potsdam_root: Path) -> None:
    layout = PotsdamLayout(str(potsdam_root), image="irrg", elevation="ndsm", eroded=True)
    refs = layout.scan()
    ref = next(r for r in refs["test"] if r.id == "3_13")
    assert ref.files["dsm"].endswith("1_DSM_normalisation/dsm_potsdam_03_13_normalized_lastools.jpg")
    sample = layout.read(ref)
    assert sample.arrays["image"].shape[0] == 3 and sample.arrays["dsm"].shape[-2:] == sample.label.shape
    assert (sample.label == 255).any()


@pytest.mark.parametrize("name", ["vaihingen", "potsdam"])
@pytest.mark.slow
def test_one_training_epoch(name: str, vaihingen_root: Path, potsdam_root: Path, tmp_path: Path) -> None:
    train_one_epoch(name, vaihingen_root if name == "vaihingen" else potsdam_root, tmp_path)


def test_bad_input(vaihingen_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(vaihingen_root, root)
    (root / "dsm" / "dsm_09cm_matching_area1.tif").unlink()                          # missing modality
    gts = root / "gts_for_participants" / "top_mosaic_09cm_area3.tif"              # off-palette, far
    with rasterio.open(gts, "r+") as dst:
        data = dst.read()
        data[:, 0, 0] = (10, 20, 30)
        dst.write(data)
    dsm5 = root / "dsm" / "dsm_09cm_matching_area5.tif"                            # sizes disagree (>2 px)
    with rasterio.open(dsm5) as src:
        profile, data = src.profile, src.read()
    profile.update(width=data.shape[-1] - 5)
    with rasterio.open(dsm5, "w", **profile) as dst:
        dst.write(data[..., :-5])
    top2 = root / "top" / "top_mosaic_09cm_area2.tif"                              # wrong band count
    with rasterio.open(top2) as src:
        profile, data = src.profile, src.read()
    profile.update(count=4)
    with rasterio.open(top2, "w", **profile) as dst:
        dst.write(np.concatenate([data, data[:1]]))
    store = PatchStore(prepare_store(VaihingenLayout(str(root)), tmp_path / "s.zarr", 64, progress=False))
    joined = "\n".join(store.meta["skipped"])
    assert len(store.meta["skipped"]) == 4, joined
    assert "dsm_09cm_matching_area1.tif: the file is missing" in joined
    assert "top_mosaic_09cm_area3.tif: label colours [(10, 20, 30)]" in joined
    assert "sizes disagree" in joined and "area5" in joined
    assert "top_mosaic_09cm_area2.tif: has 4 bands" in joined
    with pytest.raises(ConfigError, match=r"^dataset.layout.image=rgbir is not known; use irrg; Vaihingen ships IRRG "):
        build_layout({"_target_": "segplat.data.layouts.isprs.VaihingenLayout", "image": "rgbir"}, str(root))
    with pytest.raises(DataError, match="no vaihingen image tiles"):
        VaihingenLayout(str(tmp_path)).scan()


def _rewrite(path: Path, transform=None, georeferenced: bool = True) -> None:
    with rasterio.open(path) as src:
        profile, data = src.profile, src.read()
    if transform is not None:
        profile.update(transform=transform)
    if not georeferenced:
        profile.pop("crs", None)
        profile.pop("transform", None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def test_grids_of_dsm_and_label_are_checked_against_the_image(vaihingen_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "v"
    shutil.copytree(vaihingen_root, root)
    dsm = root / "dsm" / "dsm_09cm_matching_area1.tif"
    with rasterio.open(dsm) as src:
        t = src.transform
    _rewrite(dsm, t @ rasterio.Affine.translation(12, 0))  # 12 px east of its image
    layout = VaihingenLayout(str(root))
    ref = next(r for r in layout.scan()["train"] if r.id == "1")
    with pytest.raises(DataError, match=r"dsm_09cm_matching_area1.tif and .*top_mosaic_09cm_area1.tif are not on the "
                                        r"same grid \(origin .*: \+12.00 px across, \+0.00 px down\); set "
                                        r"dataset.layout.resample=true"):
        layout.read(ref)
    warped = VaihingenLayout(str(root), resample=True).read(ref).arrays["dsm"][0]
    original = _read(vaihingen_root / "dsm" / "dsm_09cm_matching_area1.tif")[0]
    np.testing.assert_array_equal(warped[:, 12:], original[:, :-12])  # the DSM's pixels on the image's ground
    assert np.isnan(warped[:, :12]).all()  # no DSM there: no data, not zero
    # a label saved without georeferencing is paired with its image by size, and the notes count it
    _rewrite(root / "gts_for_participants" / "top_mosaic_09cm_area3.tif", georeferenced=False)
    plain = VaihingenLayout(str(root))
    plain.read(next(r for r in plain.scan()["train"] if r.id == "3"))
    assert plain.notes[-1].startswith("1 DSM/label file(s) carry no georeferencing")


def test_val_tiles_and_image_bands(potsdam_root: Path) -> None:
    layout = PotsdamLayout(str(potsdam_root), image="rgbir", image_bands=["nir", 1], val_tiles=["2_11"])
    refs = layout.scan()
    assert [r.id for r in refs["val"]] == ["2_11"] and "2_11" not in [r.id for r in refs["train"]]
    assert layout.modalities["image"].bands == ("nir", "red")
    ref = refs["val"][0]
    np.testing.assert_array_equal(layout.read(ref).arrays["image"], _read(ref.files["image"])[[3, 0]])
    with pytest.raises(ConfigError, match=r"val_tiles names \['3_13'\], which are not training tiles"):
        PotsdamLayout(str(potsdam_root), val_tiles=["3_13"])
    with pytest.raises(ConfigError, match=r"image_bands names 'swir'"):
        PotsdamLayout(str(potsdam_root), image_bands=["swir"])
