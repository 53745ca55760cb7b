"""Tiles read from their chunk bytes (memory maps, shards, compressed chunks) give exactly what zarr gives;
damage (a missing chunk of a written tile, a wrong size, a checksum mismatch, a bad label value) is an error
naming the store, array and tile; unknown layouts fall back to zarr."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from segplat.data.chunk_reader import InMemoryArray, TileReader, crop_reader, fast_path_problem
from segplat.data.dataset import PatchDataset, collate
from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef
from segplat.data.store import PatchStore, compressor_codecs, prepare_store, verify_store
from segplat.errors import DataError

KEYS = [  # the ways PatchDataset and its helpers index a store array
    (1,), (np.int64(2),), (-1,),
    (1, Ellipsis, slice(3, 11), slice(5, 16)),
    (0, Ellipsis, slice(0, 16), slice(8, 16)),
    (2, slice(1, 2)),
    (1, Ellipsis, slice(10, 40), slice(-4, None)),  # clipped and negative slices, as numpy and zarr clip
]


def _values(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("float") or dtype.startswith(">f") or dtype.startswith("<f"):
        v = rng.standard_normal(shape).astype(dtype)
        v.flat[::7] = np.nan
        return v
    info = np.iinfo(np.dtype(dtype))
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def _array(tmp_path: Path, dtype: str, shape: tuple[int, ...], compressor: str | None = None, per_shard: int = 1,
           **kw) -> zarr.Array:
    """A store array as prepare_store writes it: one tile per chunk (optionally N per shard), crc32c, every written
    tile stored even when it equals the fill value; tile 3 is never written."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    fill = {"bool": False}.get(dtype, np.nan if "f" in dtype else 7)
    name = f"a_{dtype.replace('>', 'be')}_{len(shape)}_{compressor}_{per_shard}"
    shards = (per_shard, *shape[1:]) if per_shard > 1 else None
    rng = np.random.default_rng(len(shape))
    with zarr.config.set({"array.write_empty_chunks": True}):  # read when the array object is made
        arr = group.create_array(name, shape=shape, chunks=(1, *shape[1:]), shards=shards, dtype=dtype,
                                 fill_value=fill, compressors=compressor_codecs(compressor), **kw)
        for t in (0, 1, 2, 4):
            arr[t] = _values(dtype, shape[1:], rng)
        arr[2] = np.full(shape[1:], fill, dtype=dtype)  # equals the fill value and is still stored
    return arr


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # NaN positions must agree too


def _chunk_file(arr: zarr.Array, tile: int) -> Path:
    reader = crop_reader(arr)
    return Path(arr.store_path.store.root) / reader.layout.object_of(tile)[0]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "bool", "int16", ">u2"])
@pytest.mark.parametrize("shape", [(5, 3, 16, 16), (5, 4, 2, 8, 16)], ids=["4d", "5d-temporal"])
def test_memmap_crops_equal_zarr(tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    kw = {"serializer": zarr.codecs.BytesCodec(endian="big")} if dtype.startswith(">") else {}
    arr = _array(tmp_path, dtype, shape, **kw)
    reader = crop_reader(arr)
    assert isinstance(reader, TileReader), fast_path_problem(arr)
    assert not _chunk_file(arr, 3).exists() and _chunk_file(arr, 2).exists()
    for key in KEYS:
        _same(reader[key], np.asarray(arr[key]))
    crop = reader[1, ..., 0:4, 0:4]
    crop[...] = 0  # a plain writable copy: augmentations may work in place without touching the store
    _same(reader[1, ..., 0:4, 0:4], np.asarray(arr[1, ..., 0:4, 0:4]))


@pytest.mark.parametrize("compressor", [None, "zstd", "lz4"])
@pytest.mark.parametrize("per_shard", [1, 2, 5])
def test_compressed_and_sharded_tiles_equal_zarr(tmp_path: Path, compressor: str | None, per_shard: int) -> None:
    arr = _array(tmp_path, "uint16", (5, 3, 16, 16), compressor, per_shard)
    reader = crop_reader(arr, verify=True)
    assert isinstance(reader, TileReader) and reader.layout.tiles_per_object == per_shard
    assert reader.layout.checksum
    for key in KEYS:
        _same(reader[key], np.asarray(arr[key]))
    files = sorted(p for p in Path(arr.store_path.store.root, arr.path).rglob("*") if p.is_file() and
                   p.name != "zarr.json")
    assert len(files) == {1: 4, 2: 3, 5: 1}[per_shard]  # tiles 0,1,2,4 in one object each, or per shard
    with pytest.raises(DataError, match=f"{arr.path} tile 3 has no (chunk|shard index entry)"):
        reader[3, ..., 0:4, 0:4]  # never written: the store marks no such tile, so reading it is damage


def test_label_like_array_and_other_keys_defer_to_zarr(tmp_path: Path) -> None:
    arr = _array(tmp_path, "uint8", (5, 16, 16))
    reader = crop_reader(arr)
    assert isinstance(reader, TileReader)
    for key in [(1, slice(2, 10), slice(3, 9)), (slice(0, 2),), (1, slice(0, 16, 2)), ([0, 2],)]:
        _same(reader[key], np.asarray(arr[key]))
    with pytest.raises(IndexError):
        reader[5]


def test_unknown_layouts_fall_back_to_zarr_or_memory(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    part_tiles = group.create_array("sh", shape=(2, 16, 16), shards=(1, 16, 16), chunks=(1, 8, 8), dtype="uint8")
    split = group.create_array("sp", shape=(2, 16, 16), chunks=(1, 8, 16), dtype="uint8")
    gzip = group.create_array("gz", shape=(2, 16, 16), chunks=(1, 16, 16), dtype="uint8",
                              compressors=[zarr.codecs.GzipCodec()])
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 16, 16), chunks=(1, 16, 16), dtype="uint8")
    assert "whole tiles" in fast_path_problem(part_tiles)
    assert "chunks" in fast_path_problem(split)
    assert "codecs" in fast_path_problem(gzip)
    for arr in (part_tiles, split, gzip, memory):
        assert crop_reader(arr, in_memory_bytes=0) is arr
    small = crop_reader(gzip, in_memory_bytes=gzip.nbytes)
    assert isinstance(small, InMemoryArray)
    small[1][...] = 3  # reads are copies: the kept array is never changed by a caller
    _same(small[1], np.asarray(gzip[1]))


@pytest.mark.parametrize("size", [0, 100, 2000])
def test_truncated_chunk_file_is_a_clear_data_error(tmp_path: Path, size: int) -> None:
    arr = _array(tmp_path, "uint16", (5, 3, 16, 16))
    reader = crop_reader(arr)
    path = _chunk_file(arr, 1)
    path.write_bytes(path.read_bytes()[:size] + b"\0" * max(0, size - path.stat().st_size))
    with pytest.raises(DataError, match=f"{arr.path} tile 1 has a chunk of .*bytes.*damaged"):
        reader[1, ..., 0:4, 0:4]
    _same(reader[0, ..., 0:4, 0:4], np.asarray(arr[0, ..., 0:4, 0:4]))  # other tiles still read


@pytest.mark.parametrize("per_shard", [1, 5])
def test_flipped_bytes_fail_the_checksum_when_verified(tmp_path: Path, per_shard: int) -> None:
    arr = _array(tmp_path, "uint16", (5, 3, 16, 16), per_shard=per_shard)
    good = np.asarray(arr[1])
    path = _chunk_file(arr, 1)
    data = bytearray(path.read_bytes())
    offset = (3 * 16 * 16 * 2 + 4 if per_shard > 1 else 0) + 10  # in a shard tile 1 follows tile 0 + its crc32c
    data[offset] ^= 0xFF  # same size, one byte changed inside tile 1's data
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{arr.path} tile 1 has a chunk whose checksum does not match"):
        crop_reader(arr, verify=True)[1, ..., 0:2, 0:2]
    unverified = crop_reader(arr, verify=False)[1]  # dataset.verify=once/off: checked up front, not per read
    assert (unverified != good).any()
    with pytest.raises(ValueError, match="checksum"):  # zarr's own crc32c codec agrees that the chunk is damaged
        arr[1]


def test_open_maps_are_bounded_and_not_pickled(tmp_path: Path) -> None:
    arr = _array(tmp_path, "uint16", (5, 3, 16, 16))
    reader = TileReader(arr, crop_reader(arr).source, max_open=2)
    for t in (0, 1, 2, 4):
        reader[t, ..., 0:2, 0:2]
    assert len(reader._maps) == 2
    clone = pickle.loads(pickle.dumps(reader))
    assert not clone._maps
    _same(clone[4, ..., 1:5, 2:9], np.asarray(arr[4, ..., 1:5, 2:9]))


class _TinyLayout(Layout):
    """An optical uint16 image, a float32 time series with NaN no-data and dates, and a label."""

    name = "tiny_chunks"
    classes = ("a", "b", "c")
    palette = ((0, 0, 0), (255, 0, 0), (0, 255, 0))
    splits = ("train",)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"image": ModalitySpec(("r", "g", "b"), nodata=0, dtype="uint16"),
                "series": ModalitySpec(("vv", "vh"), nodata=float("nan"), dtype="float32", optical=False,
                                       temporal=True, max_time=3)}

    def scan(self) -> dict[str, list[SampleRef]]:
        return {"train": [SampleRef(str(i)) for i in range(2)]}

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        return (48, 40)  # tiles of 32: the border tiles are padded with fill values

    def read(self, ref: SampleRef) -> Sample:
        rng = np.random.default_rng(int(ref.id))
        image = rng.integers(1, 4000, (3, 48, 40)).astype(np.uint16)
        series = rng.standard_normal((2, 2, 48, 40)).astype(np.float32)
        series[1, :, :8] = np.nan
        label = rng.integers(0, 3, (48, 40)).astype(np.uint8)
        return Sample({"image": image, "series": series}, label, source=f"s{ref.id}",
                      dates={"series": np.array([3, 17], dtype=np.int32)})


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chunks") / "tiny.zarr"
    return prepare_store(_TinyLayout(str(path.parent)), path, 32, "none", progress=False)


@pytest.mark.parametrize(("compressor", "per_shard"), [("lz4", 1), ("none", 3), ("zstd", 2)])
def test_patch_dataset_on_compressed_and_sharded_stores(tmp_path: Path, compressor: str, per_shard: int) -> None:
    path = prepare_store(_TinyLayout(str(tmp_path)), tmp_path / "s.zarr", 32, compressor, progress=False,
                         tiles_per_shard=per_shard)
    fast = PatchDataset(str(path), "train", 16, train=True, patches_per_tile=2)
    slow = PatchDataset(str(path), "train", 16, train=True, patches_per_tile=2, chunk_memmap=False)
    assert all(isinstance(r, TileReader) for r in (fast._open()[k] for k in ("image", "series", "label")))
    for i in range(len(fast)):
        _check_same(fast[i], slow[i])
    assert verify_store(PatchStore(path), deep=True) == []


def test_label_values_out_of_range_stop_with_the_tile(tmp_path: Path) -> None:
    path = prepare_store(_TinyLayout(str(tmp_path)), tmp_path / "s.zarr", 32, "none", progress=False)
    label = zarr.open_array(str(path / "train" / "label"), mode="r+")
    tile = label[2][...]
    tile[5, 5] = 9  # three classes and ignore 255: 9 is neither (a valid chunk with a valid checksum)
    label[2] = tile
    ds = PatchDataset(str(path), "train", 32, train=False)
    with pytest.raises(DataError, match=r"train/label tile 2 holds the value 9, outside the 3 classes"):
        [ds[i] for i in range(len(ds))]
    problems = verify_store(PatchStore(path), deep=True)
    assert len(problems) == 1 and "train/label tile 2 holds the value 9" in problems[0]


def test_a_store_with_unwritten_samples_is_named_before_its_chunks_are_read(tmp_path: Path) -> None:
    path = prepare_store(_TinyLayout(str(tmp_path)), tmp_path / "s.zarr", 32, "none", progress=False)
    done = zarr.open_array(str(path / "train" / "done"), mode="r+")
    flags = np.asarray(done[:]).copy()
    flags[1] = False  # a preparer killed before its last sample, with the marker written by hand
    done[:] = flags
    shutil.rmtree(path / "train" / "label")  # and an array gone: no chunk of this split is read
    problems = verify_store(PatchStore(path), deep=True)
    assert problems == ["train/label is missing or does not have 8 tiles", "train: 1 samples were never written"]


def _check_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        _same(np.asarray(a[k]), np.asarray(b[k]))


def test_patch_dataset_memmap_equals_zarr_path(raw_store: Path) -> None:
    for train, balanced in ((True, 0.0), (True, 1.0), (False, 0.0)):
        fast = PatchDataset(str(raw_store), "train", 16, train=train, patches_per_tile=3, class_balanced=balanced)
        slow = PatchDataset(str(raw_store), "train", 16, train=train, patches_per_tile=3, class_balanced=balanced,
                            chunk_memmap=False)
        handles = fast._open()
        assert all(isinstance(handles[k], TileReader) for k in ("image", "series", "label", "series_dates"))
        for i in range(len(fast)):
            _check_same(fast[i], slow[i])


@pytest.mark.slow
def test_patch_dataset_pickles_and_loads_with_two_workers(raw_store: Path) -> None:
    ds = PatchDataset(str(raw_store), "train", 16, train=True, patches_per_tile=2)
    ds[0]  # opens maps in this process: they must not travel to the workers
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._group is None
    _check_same(clone[3], ds[3])
    want = collate([ds[i] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=2, collate_fn=collate,
                                         multiprocessing_context="spawn", persistent_workers=False)
    loader_fork = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate,
                                              multiprocessing_context="fork")
    got = next(iter(loader))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].nan_to_num(), want[k].nan_to_num()) and got[k].dtype == want[k].dtype
    forked = collate([{k: v[j].numpy() for k, v in b.items()} for b in loader_fork for j in range(len(b["tile"]))])
    for k in want:
        assert torch.equal(forked[k].nan_to_num(), want[k].nan_to_num())
