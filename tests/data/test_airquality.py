"""airquality: fake GeoTIFF tree -> layout -> store (two grids at their own resolutions) -> one training epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segplat.data.dataset import PatchDataset
from segplat.data.fake.airquality import write_fake
from segplat.data.layouts.airquality import AirQualityLayout, companion_names
from segplat.data.store import PatchStore, prepare_store
from segplat.errors import ConfigError, DataError
from tests.conftest import compose_train


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake(tmp_path_factory.mktemp("aq"), num_train=3, num_val=2)


def test_read_gives_native_grids_and_mapped_mask(fake_root: Path) -> None:
    layout = AirQualityLayout(str(fake_root))
    splits = layout.scan()
    assert [len(splits["train"]), len(splits["val"])] == [3, 2]
    ref = splits["train"][0]
    sample = layout.read(ref)
    assert sample.arrays["image"].shape == (4, 512, 512) and sample.arrays["image"].dtype == np.uint16
    assert sample.arrays["air"].shape == (48, 64, 64) and sample.arrays["air"].dtype == np.float32
    with rasterio.open(ref.files["mask"]) as src:
        raw = src.read(1)
    assert set(np.unique(raw)) == {10, 90}
    np.testing.assert_array_equal(sample.label, np.where(raw == 10, 1, 0))
    # channel order: GEMS 12, CO 12, NO2 12, SO2 12 (the fake raises NO2 over urban pixels)
    with rasterio.open(ref.files["NO2"]) as src:
        np.testing.assert_array_equal(sample.arrays["air"][24:36], src.read())
    assert sample.crs == "EPSG:32650" and sample.transform[0] == 10.0


def test_mask_table_is_configuration(fake_root: Path) -> None:
    ref = AirQualityLayout(str(fake_root)).scan()["train"][0]
    flipped = AirQualityLayout(str(fake_root), mask_values={"90": 1, "10": 0}).read(ref).label
    default = AirQualityLayout(str(fake_root)).read(ref).label
    np.testing.assert_array_equal(flipped, 1 - default)
    with pytest.raises(DataError, match=r"not in dataset\.layout\.mask_values"):
        AirQualityLayout(str(fake_root), mask_values={90: 0}).read(ref)
    ignored = AirQualityLayout(str(fake_root), mask_values={90: 0}, unknown_mask_values="ignore").read(ref).label
    assert set(np.unique(ignored)) == {0, 255}
    with pytest.raises(ConfigError, match="mask_values"):
        AirQualityLayout(str(fake_root), mask_values={90: 7})


def test_band_count_mismatch_names_file_and_key(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "aq", num_train=1, num_val=0, image_size=128, air_size=16, bands_per_file=10)
    layout = AirQualityLayout(str(root), image_size=128, air_size=16)
    ref = layout.scan()["train"][0]
    with pytest.raises(DataError, match=r"GEMS_.*has 10 bands but dataset.layout.bands_per_file=12"):
        layout.read(ref)
    sample = AirQualityLayout(str(root), image_size=128, air_size=16, bands_per_file=10).read(ref)
    assert sample.arrays["air"].shape == (40, 16, 16)


def test_off_size_companion_is_resampled_and_reported(tmp_path: Path) -> None:
    """A companion over the image's extent at another size is resampled and counted; one whose pixels are the
    right size for another extent (here a quarter of the image) is refused, or warped with resample=true."""
    root = write_fake(tmp_path / "aq", num_train=2, num_val=0, image_size=128, air_size=16)
    stem = sorted((root / "ts_sn").iterdir())[0].stem
    path = root / "t_ap" / companion_names(stem)["CO"]
    with rasterio.open(path) as src:
        profile = src.profile
    half = profile["transform"] @ rasterio.Affine.scale(0.5)
    profile.update(height=32, width=32, transform=half)  # the same ground, twice as fine
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((12, 32, 32), 3.0, np.float32))
    layout = AirQualityLayout(str(root), image_size=128, air_size=16)
    sample = layout.read(layout.scan()["train"][0])
    np.testing.assert_allclose(sample.arrays["air"][12:24], 3.0)
    assert layout.resampled == 1 and "resampled" in layout.notes[0]
    # 32x32 pixels of the air grid's size: twice the image's extent in each direction, from the same origin
    profile.update(transform=half @ rasterio.Affine.scale(2.0))
    values = np.arange(32 * 32, dtype=np.float32).reshape(1, 32, 32).repeat(12, 0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values)
    with pytest.raises(DataError, match=r"not on the same grid \(32x32 px vs 16x16 px over the same origin\)") as err:
        layout.read(layout.scan()["train"][0])
    assert str(path) in str(err.value) and "dataset.layout.resample=true" in str(err.value)
    warped = AirQualityLayout(str(root), image_size=128, air_size=16, resample=True).read(layout.scan()["train"][0])
    np.testing.assert_array_equal(warped.arrays["air"][12], values[0, :16, :16])  # the part over the image


def test_prepare_keeps_both_grids_and_skips_a_sample_missing_a_companion(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "aq", num_train=3, num_val=1, image_size=128, air_size=16)
    stem = sorted((root / "ts_sn").iterdir())[1].stem
    (root / "t_gems" / companion_names(stem)["GEMS"]).unlink()
    layout = AirQualityLayout(str(root), image_size=128, air_size=16)
    path = prepare_store(layout, tmp_path / "store.zarr", tile_size=128, progress=False)
    store = PatchStore(path)
    group = store.split("train")
    assert group["image"].shape == (3, 4, 128, 128) and group["air"].shape == (3, 48, 16, 16)
    assert len(store.meta["skipped"]) == 1 and f"GEMS_{stem}.tif" in store.meta["skipped"][0]
    marker = json.loads((path / "_SEGPLAT_COMPLETE.json").read_text())
    assert marker["skipped"] == 1
    ds = PatchDataset(str(path), "train", 64, train=True)
    assert len(ds) == 2  # the skipped sample leaves no tile
    item = ds[0]
    assert item["image"].shape == (4, 64, 64) and item["air"].shape == (48, 8, 8)
    y, x = item["offset"]
    tile = int(item["tile"])
    np.testing.assert_array_equal(item["air"], group["air"][tile, :, y // 8:y // 8 + 8, x // 8:x // 8 + 8])
    # statistics over valid pixels only: the image's 0-valued no-data corner is excluded
    img = group["image"][:][[i for i, m in enumerate(store.tiles_meta("train")) if m is not None]].astype(np.float64)
    vals = img.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(store.stats["image"]["mean"], [v[v != 0].mean() for v in vals], rtol=1e-6)
    with pytest.raises(ConfigError, match="multiple of 8"):
        PatchDataset(str(path), "train", 60, train=True)


@pytest.mark.slow
def test_one_training_epoch(tmp_path: Path) -> None:
    from segplat.train import train

    root = write_fake(tmp_path / "aq", num_train=4, num_val=2, image_size=128, air_size=16)
    cfg = compose_train([
        "dataset=airquality", f"dataset.root={root}", "dataset.layout.image_size=128", "dataset.layout.air_size=16",
        "dataset.tile_size=128", "dataset.patch_size=64", "dataset.batch_size=4", "dataset.val_batch_size=8",
        "dataset.num_workers=0", "dataset.augment.ssr=0.5", "model=unet", "fusion=mid",
        "model.encoder.name=resnet10t", "model.decoder.channels=[16,16,16,16]", "logger=none",
        "trainer=cpu", "trainer.progress=false", "trainer.max_epochs=1",
    ], output_dir=tmp_path / "run")
    score = train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and np.isfinite(score)
    assert set(summary["per_class_iou"]) == {"background", "industrial_urban"}


def test_a_shifted_mask_is_refused_or_warped(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "aq", num_train=1, num_val=0, image_size=128, air_size=16)
    layout = AirQualityLayout(str(root), image_size=128, air_size=16)
    ref = layout.scan()["train"][0]
    with rasterio.open(ref.files["mask"]) as src:
        profile, mask = src.profile, src.read()
    profile.update(transform=profile["transform"] @ rasterio.Affine.translation(0, 8))  # 8 rows south
    with rasterio.open(ref.files["mask"], "w", **profile) as dst:
        dst.write(mask)
    with pytest.raises(DataError, match=r"tl_sn/.*.tif and .*ts_sn/.*.tif are not on the same grid \(origin .*: "
                                        r"\+0.00 px across, \+8.00 px down\)"):
        layout.read(ref)
    label = AirQualityLayout(str(root), image_size=128, air_size=16, resample=True).read(ref).label
    np.testing.assert_array_equal(label[8:], np.where(mask[0, :-8] == 10, 1, 0))
    assert (label[:8] == 255).all()  # no mask there: ignored, not background
