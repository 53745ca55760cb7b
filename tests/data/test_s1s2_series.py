"""s1s2_series: fake PASTIS-R tree -> layout -> temporal store -> PatchDataset batches -> one training epoch."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from segplat.data.dataset import PatchDataset, collate
from segplat.data.fake.s1s2_series import write_fake
from segplat.data.layouts.base import build_layout
from segplat.data.layouts.s1s2_series import VOID_CLASS, S1S2SeriesLayout
from segplat.data.store import PatchStore, prepare_store
from segplat.errors import ConfigError, DataError
from tests.conftest import CONF_DIR, compose_train

S1S2 = "segplat.data.layouts.s1s2_series.S1S2SeriesLayout"


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake(tmp_path_factory.mktemp("pastis"), num_patches=10, size=32)


def test_folds_map_to_splits(fake_root: Path) -> None:
    splits = S1S2SeriesLayout(str(fake_root)).scan()
    meta = {f["properties"]["ID_PATCH"]: f["properties"]["Fold"]
            for f in json.loads((fake_root / "metadata.geojson").read_text())["features"]}
    assert {s: sorted(meta[int(r.id)] for r in refs) for s, refs in splits.items()} == {
        "train": [1, 1, 2, 2, 3, 3], "val": [4, 4], "test": [5, 5]}
    custom = S1S2SeriesLayout(str(fake_root), folds={"train": [1, 2, 3, 4], "val": [5]}).scan()
    assert [len(custom["train"]), len(custom["val"])] == [8, 2]
    with pytest.raises(ConfigError, match="fold 4"):
        S1S2SeriesLayout(str(fake_root), folds={"train": [1, 4], "val": [4]})


def test_read_drops_nodata_dates_and_gives_day_offsets(fake_root: Path) -> None:
    layout = S1S2SeriesLayout(str(fake_root))
    ref = layout.scan()["train"][0]
    raw = np.load(ref.files["s2"])
    props = layout.metadata()[ref.id]
    sample = layout.read(ref)
    s2 = sample.arrays["s2"]
    assert s2.dtype == np.int16 and s2.shape == (raw.shape[0] - 1, 10, 32, 32)  # date 1 is all no-data
    dates = [props["dates-S2"][k] for k in sorted(props["dates-S2"], key=int)]
    expected = [(dt.date(d // 10000, d // 100 % 100, d % 100) - dt.date(2018, 9, 1)).days for d in dates]
    np.testing.assert_array_equal(sample.dates["s2"], np.delete(expected, 1))
    np.testing.assert_array_equal(s2, np.delete(raw, 1, axis=0))
    assert sample.arrays["s1"].dtype == np.float32 and sample.arrays["s1"].shape[1] == 3
    target = np.load(ref.files["label"])[0]
    assert (sample.label[target == VOID_CLASS] == 255).all()
    np.testing.assert_array_equal(sample.label[target != VOID_CLASS], target[target != VOID_CLASS])
    kept = S1S2SeriesLayout(str(fake_root), drop_nodata_dates=False).read(ref)
    assert kept.arrays["s2"].shape[0] == raw.shape[0]


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "p", num_patches=5, size=16)
    layout = S1S2SeriesLayout(str(root))
    ref = layout.scan()["train"][0]
    s1 = np.load(ref.files["s1"])
    np.save(ref.files["s1"], s1[:-1])  # one frame short of its dates
    with pytest.raises(DataError, match=r"S1A_.*frames but metadata.geojson lists"):
        layout.read(ref)
    np.save(ref.files["s1"], s1[:, :2])
    with pytest.raises(DataError, match=r"is not \(T, 3, H, W\)"):
        layout.read(ref)
    with pytest.raises(DataError, match="dates before"):
        S1S2SeriesLayout(str(root), reference_date="2019-06-01").read(layout.scan()["train"][1])
    (root / "metadata.geojson").unlink()
    with pytest.raises(DataError, match=r"metadata\.geojson is missing"):
        S1S2SeriesLayout(str(root)).scan()


def test_store_and_batches_pad_time_with_a_mask(tmp_path: Path, fake_root: Path) -> None:
    layout = S1S2SeriesLayout(str(fake_root), max_time={"s2": 6, "s1": None})
    path = prepare_store(layout, tmp_path / "s.zarr", tile_size=32, progress=False)
    store = PatchStore(path)
    specs = store.modalities
    assert specs["s2"].temporal and specs["s2"].max_time == 6 and specs["s1"].max_time == 9
    assert store.split("train")["s2"].shape == (6, 6, 10, 32, 32)
    assert any("dropped" in n for n in store.meta["notes"])
    ds = PatchDataset(str(path), "train", 16, train=True)
    batch = collate([ds[i] for i in range(4)])
    assert batch["s2"].shape == (4, 6, 10, 16, 16) and batch["s1"].shape == (4, 9, 3, 16, 16)
    mask, dates = batch["s2_time_mask"], batch["s2_dates"]
    assert mask.dtype.is_floating_point is False and (mask == (dates >= 0)).all()
    # padded dates hold the no-data fill and sort after the real ones
    for b in range(4):
        n = int(mask[b].sum())
        assert (dates[b, :n] >= 0).all() and (dates[b, n:] == -1).all()
        assert (batch["s2"][b, n:] == 0).all()
        assert (np.diff(dates[b, :n].numpy()) > 0).all()
    # a series longer than max_time is subsampled evenly, keeping its first and last date
    lay4 = S1S2SeriesLayout(str(fake_root), max_time={"s2": 3, "s1": None})
    sample = lay4.read(lay4.scan()["train"][0])
    full = S1S2SeriesLayout(str(fake_root)).read(lay4.scan()["train"][0])
    assert sample.arrays["s2"].shape[0] == 3 and lay4.subsampled == 1
    assert sample.dates["s2"][0] == full.dates["s2"][0] and sample.dates["s2"][-1] == full.dates["s2"][-1]


@pytest.mark.slow
def test_one_training_epoch(tmp_path: Path, fake_root: Path) -> None:
    pytest.importorskip("segplat.models.unet3d")
    if not (CONF_DIR / "model" / "unet3d.yaml").is_file():
        pytest.skip("conf/model/unet3d.yaml is not there yet")
    from segplat.train import train

    cfg = compose_train([
        "dataset=s1s2_series", f"dataset.root={fake_root}", "dataset.tile_size=32", "dataset.patch_size=16",
        "dataset.batch_size=4", "dataset.val_batch_size=4", "dataset.num_workers=0", "model=unet3d", "fusion=mid",
        "model.widths=[8,16]", "model.heads=2", "model.pool=mean", "trainer.limit_val_batches=2",
        "logger=none", "trainer=cpu", "trainer.progress=false", "trainer.max_epochs=1",
    ], output_dir=tmp_path / "run")
    score = train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and np.isfinite(score)


def test_band_selection_and_messages_that_say_the_fix(fake_root: Path, tmp_path: Path) -> None:
    layout = S1S2SeriesLayout(str(fake_root), bands={"s2": ["B8", "B4"], "s1": [1]})
    assert layout.modalities["s2"].bands == ("B8", "B4") and layout.modalities["s1"].bands == ("VV",)
    ref = layout.scan()["train"][0]
    full = S1S2SeriesLayout(str(fake_root)).read(ref)
    picked = layout.read(ref)
    np.testing.assert_array_equal(picked.arrays["s2"], full.arrays["s2"][:, [6, 2]])
    np.testing.assert_array_equal(picked.arrays["s1"], full.arrays["s1"][:, :1])
    with pytest.raises(ConfigError, match=r"dataset.layout.bands.s2 names 'B1'"):
        S1S2SeriesLayout(str(fake_root), bands={"s2": ["B1"]})
    with pytest.raises(ConfigError, match=r"^dataset.layout.nodata.s3 is not a key of dataset.layout.nodata; its "
                                          r"keys are s1 or s2\.$"):
        build_layout({"_target_": S1S2, "nodata": {"s3": 0}}, str(fake_root))
    root = write_fake(tmp_path / "p", num_patches=5, size=16)
    meta = json.loads((root / "metadata.geojson").read_text())
    del meta["features"][0]["properties"]["dates-S2"]
    (root / "metadata.geojson").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r'has no dates-S2 date dict in metadata.geojson; add one \("dates-S2": '
                                        r'\{"0": 20180924, ...\}, one date per frame\) or leave s2 out of '
                                        r"dataset.layout.sensors"):
        S1S2SeriesLayout(str(root)).modalities  # noqa: B018


def test_patches_are_georeferenced_from_their_footprints_or_not_at_all(tmp_path: Path, fake_root: Path) -> None:
    """metadata.geojson's crs member and each patch's footprint give the store's CRS and transform (10 m pixels,
    the footprint's north-west corner); no CRS, or a footprint that is not an axis-aligned rectangle, gives none."""
    path = prepare_store(S1S2SeriesLayout(str(fake_root)), tmp_path / "s.zarr", tile_size=32, progress=False)
    doc = json.loads((fake_root / "metadata.geojson").read_text())
    footprints = {str(f["properties"]["ID_PATCH"]): f["geometry"]["coordinates"][0] for f in doc["features"]}
    tiles = PatchStore(path).tiles_meta("train")
    assert tiles and all(t["crs"] == "EPSG:2154" for t in tiles)
    for tile in tiles:
        ring = np.array(footprints[Path(tile["source"]).stem.removeprefix("TARGET_")])
        a, b, c, d, e, f = tile["transform"][:6]
        assert (a, b, d, e) == (10.0, 0.0, 0.0, -10.0)
        assert (c, f) == (ring[:, 0].min(), ring[:, 1].max())
    # without a crs member, or with a rotated footprint: no georeference, and the store says how many
    other = tmp_path / "other"
    write_fake(other, num_patches=10, size=32)
    doc = json.loads((other / "metadata.geojson").read_text())
    del doc["crs"]
    (other / "metadata.geojson").write_text(json.dumps(doc))
    layout = S1S2SeriesLayout(str(other))
    sample = layout.read(layout.scan()["train"][0])
    assert sample.crs is None and sample.transform is None
    assert any("without georeference (metadata.geojson names no CRS)" in n for n in layout.notes)
    doc["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::2154"}}
    doc["features"][0]["geometry"]["coordinates"][0][1][1] += 5.0  # one corner moved: not a rectangle
    (other / "metadata.geojson").write_text(json.dumps(doc))
    layout = S1S2SeriesLayout(str(other))
    first = str(doc["features"][0]["properties"]["ID_PATCH"])
    ref = next(r for refs in layout.scan().values() for r in refs if r.id == first)
    assert layout.read(ref).transform is None and layout.not_georeferenced == 1
    doc["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::999999"}}
    (other / "metadata.geojson").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"EPSG::999999.*not known"):
        S1S2SeriesLayout(str(other)).scan()


def test_one_max_time_caps_every_sensor(fake_root: Path) -> None:
    """`dataset.layout.max_time=6` (the form the model summary's hint suggests) was a raw TypeError."""
    layout = S1S2SeriesLayout(str(fake_root), max_time=6)
    assert layout.max_time("s2") == layout.max_time("s1") == 6
    assert S1S2SeriesLayout(str(fake_root), max_time={"s2": 4, "s1": None}).max_time("s2") == 4
    with pytest.raises(ConfigError, match=r"^dataset\.layout\.max_time=\[6\] must be a positive integer or a "
                                          r"section with the keys s2, s1 or null; a number of dates for every "
                                          r"sensor, or \{s2: "):
        build_layout({"_target_": S1S2, "max_time": [6]}, str(fake_root))
