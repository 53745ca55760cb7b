"""clouds: Kaggle PNG triplets -> store (pixels, NIR channel, colour labels, splits, stats) -> one epoch; bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segplat.data.fake.clouds import write_fake
from segplat.data.layouts.clouds import CloudsLayout
from segplat.data.store import prepare_store
from segplat.errors import ConfigError, DataError
from tests.data.conftest import (
    assert_padding_invalid,
    assert_stats,
    datamodule,
    prepared,
    scene_from_tiles,
    train_one_epoch,
)

BGR = {(0, 0, 0): 0, (0, 0, 255): 1, (0, 255, 0): 2, (0, 255, 255): 3}


@pytest.fixture(scope="module")
def clouds_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake(tmp_path_factory.mktemp("clouds"), seed=1, num_train=8, num_test=2)


def test_store_holds_the_pngs_exactly(clouds_root: Path) -> None:
    _, store = prepared("clouds", clouds_root)
    assert store.classes == ["background", "thick_cloud", "thin_cloud", "cloud_shadow"]
    assert store.palette == [[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 0]]
    assert store.ignore_index == 255
    mods = store.modalities
    assert mods["rgb"].bands == ("red", "green", "blue") and mods["nir"].bands == ("nir",)
    assert set(store.splits) == {"train", "val", "test"}
    sources = {s: {m["source"] for m in store.tiles_meta(s) if m} for s in ("train", "val", "test")}
    assert len(sources["train"]) + len(sources["val"]) == 8 and sources["val"] and len(sources["test"]) == 2
    for split in ("train", "val"):
        assert store.split(split)["rgb"].dtype == np.uint8 and store.split(split)["label"].dtype == np.uint8
        for src in sources[split]:
            bgr = cv2.imread(src)
            ngr = cv2.imread(src.replace("/rgb/", "/ngr/"))
            lab = cv2.imread(src.replace("/rgb/", "/label/"))
            rgb = scene_from_tiles(store, split, src, "rgb")
            assert rgb.shape == (3, *bgr.shape[:2])  # no size assumed: non-square, padded tiles
            np.testing.assert_array_equal(rgb, bgr[:, :, ::-1].transpose(2, 0, 1))
            np.testing.assert_array_equal(scene_from_tiles(store, split, src, "nir")[0], ngr[:, :, 2])
            want = np.zeros(lab.shape[:2], np.uint8)
            for colour, cls in BGR.items():
                want[(lab == colour).all(-1)] = cls
            np.testing.assert_array_equal(scene_from_tiles(store, split, src, "label"), want)
            assert scene_from_tiles(store, split, src, "valid").all()
        assert_padding_invalid(store, split)
    # test: no labels -> label all ignore, but valid wherever there is data
    test = store.split("test")
    for i, m in enumerate(store.tiles_meta("test")):
        _, _, th, tw = m["window"]
        assert (np.asarray(test["label"][i]) == 255).all()
        assert np.asarray(test["valid"][i])[:th, :tw].all()
    # statistics: NumPy over every pixel of the training images (padding must not count)
    train_src = sorted(sources["train"])
    rgb_px = np.concatenate([cv2.imread(s)[:, :, ::-1].reshape(-1, 3).T for s in train_src], axis=1)
    nir_px = np.concatenate([cv2.imread(s.replace("/rgb/", "/ngr/"))[:, :, 2].reshape(1, -1) for s in train_src],
                            axis=1)
    assert_stats(store, "rgb", rgb_px)
    assert_stats(store, "nir", nir_px)


def test_val_split_is_stable_and_seeded(clouds_root: Path) -> None:
    a = CloudsLayout(str(clouds_root), val_fraction=0.5, seed=3).scan()
    b = CloudsLayout(str(clouds_root), val_fraction=0.5, seed=3).scan()
    c = CloudsLayout(str(clouds_root), val_fraction=0.5, seed=4).scan()
    assert [r.id for r in a["val"]] == [r.id for r in b["val"]]
    ids = {r.id for r in a["val"]} | {r.id for r in a["train"]}
    assert ids == {r.id for r in c["val"]} | {r.id for r in c["train"]}
    assert [r.id for r in a["val"]] != [r.id for r in c["val"]]  # another seed, another split
    assert not {r.id for r in a["val"]} & {r.id for r in a["train"]}


@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_one_training_epoch(clouds_root: Path, tmp_path: Path) -> None:
    train_one_epoch("clouds", clouds_root, tmp_path)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_input_is_named_and_skipped(clouds_root: Path, tmp_path: Path) -> None:
    root = _copy(clouds_root, tmp_path / "bad")
    stems = sorted(p.stem for p in (root / "train" / "rgb").iterdir())
    (root / "train" / "ngr" / f"{stems[0]}.png").unlink()                       # a missing modality
    corrupt = root / "train" / "rgb" / f"{stems[1]}.png"                        # truncated PNG
    corrupt.write_bytes(corrupt.read_bytes()[:120])
    lab = cv2.imread(str(root / "train" / "label" / f"{stems[2]}.png"))          # a colour far from the palette
    lab[0, 0] = (200, 10, 90)
    cv2.imwrite(str(root / "train" / "label" / f"{stems[2]}.png"), lab)
    lab = cv2.imread(str(root / "train" / "label" / f"{stems[3]}.png"))          # within tolerance: mapped
    lab[:2, :3] = (3, 2, 250)
    cv2.imwrite(str(root / "train" / "label" / f"{stems[3]}.png"), lab)
    ngr = cv2.imread(str(root / "train" / "ngr" / f"{stems[4]}.png"))           # sizes disagree
    cv2.imwrite(str(root / "train" / "ngr" / f"{stems[4]}.png"), ngr[:-3])
    (root / "train" / "rgb" / "notes.png").write_bytes(b"not a png at all")      # unreadable header
    layout = CloudsLayout(str(root), val_fraction=0.0)
    store = prepare_store(layout, tmp_path / "s.zarr", 64, progress=False)
    from segplat.data.store import PatchStore

    skipped = PatchStore(store).meta["skipped"]
    joined = "\n".join(skipped)
    assert len(skipped) == 5, joined
    assert f"ngr/{stems[0]}.png: the file is missing" in joined
    assert f"{stems[1]}.png: cannot be decoded" in joined
    assert "[200, 10, 90]" not in joined and "(90, 10, 200)" in joined and f"label/{stems[2]}.png" in joined
    assert f"ngr/{stems[4]}.png" in joined and "sizes disagree" in joined
    assert "notes.png: is not a PNG file" in joined
    notes = PatchStore(store).meta["notes"]
    assert any(f"{stems[3]}.png: 6 off-palette" in n for n in notes), notes
    sources = {m["source"] for m in PatchStore(store).tiles_meta("train") if m}
    assert len(sources) == 4  # 8 samples, 4 of them skipped (the 5th skip is notes.png, not a sample)


def test_missing_root_and_tree(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.root is not set"):
        datamodule("clouds", "null").check_root()
    with pytest.raises(ConfigError, match="is not a folder"):
        datamodule("clouds", tmp_path / "nope").check_root()
    with pytest.raises(DataError, match=r"train/rgb is missing"):
        CloudsLayout(str(tmp_path)).scan()


def test_images_that_are_not_8_bit_colour_are_refused_not_converted(clouds_root: Path, tmp_path: Path) -> None:
    """cv2.IMREAD_COLOR copied a grey PNG into three channels: a grey rgb image trained as colour, and a class-index
    label (0..3) decoded as all background, since every grey level lay within the tolerance of black."""
    root = _copy(clouds_root, tmp_path / "grey")
    layout = CloudsLayout(str(root), val_fraction=0.0)
    refs = layout.scan()["train"]
    expected = layout.read(refs[0])
    rgb, ngr, lab = (Path(refs[i].files[k]) for i, k in ((0, "rgb"), (1, "ngr"), (2, "label")))
    cv2.imwrite(str(rgb), cv2.imread(str(rgb), cv2.IMREAD_GRAYSCALE))
    with pytest.raises(DataError, match=rf"{rgb}: is a 1-channel image, but every clouds rgb image is a 3-channel"):
        layout.read(refs[0])
    cv2.imwrite(str(lab), np.random.default_rng(0).integers(0, 4, cv2.imread(str(lab)).shape[:2], dtype=np.uint8))
    with pytest.raises(DataError, match=rf"{lab}: is a 1-channel image, but every clouds label .* is a 3-channel"):
        layout.read(refs[2])
    cv2.imwrite(str(ngr), cv2.imread(str(ngr)).astype(np.uint16) * 257)
    with pytest.raises(DataError, match=rf"{ngr}: holds uint16 pixels, but clouds images are 8-bit"):
        layout.read(refs[1])
    bgra = cv2.cvtColor(cv2.imread(str(clouds_root / "train" / "rgb" / rgb.name)), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(rgb), bgra)  # an alpha channel carries no data: read as the colour image it holds
    np.testing.assert_array_equal(layout.read(refs[0]).arrays["rgb"], expected.arrays["rgb"])
