"""The memory-map read path of raw store chunks gives exactly what zarr gives, or falls back to zarr."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from segplat.data.chunk_reader import ChunkCropReader, InMemoryArray, crop_reader, fast_path_problem
from segplat.data.dataset import PatchDataset, collate
from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef
from segplat.data.store import compressor_codecs, prepare_store
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


def _array(tmp_path: Path, dtype: str, shape: tuple[int, ...], compressor: str | None = None, **kw) -> zarr.Array:
    """A store array like prepare_store writes: one tile per chunk; tile 3 is never written (fill value)."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    fill = {"bool": False}.get(dtype, np.nan if "f" in dtype else 7)
    arr = group.create_array(f"a_{dtype.replace('>', 'be')}_{len(shape)}_{compressor}", shape=shape,
                             chunks=(1, *shape[1:]), dtype=dtype, fill_value=fill,
                             compressors=compressor_codecs(compressor), **kw)
    rng = np.random.default_rng(len(shape))
    for t in (0, 1, 2, 4):
        arr[t] = _values(dtype, shape[1:], rng)
    return arr


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # NaN positions must agree too


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "bool", "int16", ">u2"])
@pytest.mark.parametrize("shape", [(5, 3, 16, 16), (5, 4, 2, 8, 16)], ids=["4d", "5d-temporal"])
def test_memmap_crops_equal_zarr(tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    kw = {"serializer": zarr.codecs.BytesCodec(endian="big")} if dtype.startswith(">") else {}
    arr = _array(tmp_path, dtype, shape, **kw)
    reader = crop_reader(arr)
    assert isinstance(reader, ChunkCropReader), fast_path_problem(arr)
    assert not reader.chunk_path(3).exists()  # the fill-value chunk really is missing on disk
    for key in [*KEYS, (3,), (3, Ellipsis, slice(2, 9), slice(0, 4))]:
        _same(reader[key], np.asarray(arr[key]))
    crop = reader[1, ..., 0:4, 0:4]
    crop[...] = 0  # a plain writable copy: augmentations may work in place without touching the store
    _same(reader[1, ..., 0:4, 0:4], np.asarray(arr[1, ..., 0:4, 0:4]))


def test_label_like_array_and_other_keys_defer_to_zarr(tmp_path: Path) -> None:
    arr = _array(tmp_path, "uint8", (5, 16, 16))
    reader = crop_reader(arr)
    assert isinstance(reader, ChunkCropReader)
    for key in [(1, slice(2, 10), slice(3, 9)), (slice(0, 2),), (1, slice(0, 16, 2)), ([0, 2],)]:
        _same(reader[key], np.asarray(arr[key]))
    with pytest.raises(IndexError):
        reader[5]


@pytest.mark.parametrize("compressor", ["zstd", "lz4"])
def test_compressed_arrays_fall_back_to_zarr_or_memory(tmp_path: Path, compressor: str) -> None:
    arr = _array(tmp_path, "uint16", (5, 3, 16, 16), compressor)
    assert "codecs" in fast_path_problem(arr)
    assert crop_reader(arr, in_memory_bytes=arr.nbytes - 1) is arr
    small = crop_reader(arr, in_memory_bytes=arr.nbytes)
    assert isinstance(small, InMemoryArray)
    for key in [*KEYS, (3,), (slice(1, 4), 0)]:
        _same(small[key], np.asarray(arr[key]))
    small[1][...] = 0  # reads are copies: the kept array is never changed by a caller
    _same(small[1], np.asarray(arr[1]))


def test_sharded_and_multi_chunk_arrays_fall_back(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    sharded = group.create_array("sh", shape=(2, 16, 16), shards=(1, 16, 16), chunks=(1, 8, 8), dtype="uint8",
                                 compressors=None)
    split = group.create_array("sp", shape=(2, 16, 16), chunks=(1, 8, 16), dtype="uint8", compressors=None)
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 16, 16), chunks=(1, 16, 16), dtype="uint8",
                               compressors=None)
    assert "codecs" in fast_path_problem(sharded)
    assert "chunks" in fast_path_problem(split)
    assert "local file store" in fast_path_problem(memory)
    for arr in (sharded, split, memory):
        assert crop_reader(arr, in_memory_bytes=0) is arr


@pytest.mark.parametrize("size", [0, 100, 2000])
def test_damaged_chunk_file_is_a_clear_data_error(tmp_path: Path, size: int) -> None:
    arr = _array(tmp_path, "uint16", (5, 3, 16, 16))
    reader = crop_reader(arr)
    path = reader.chunk_path(1)
    path.write_bytes(path.read_bytes()[:size] + b"\0" * max(0, size - path.stat().st_size))
    with pytest.raises(DataError, match=f"{path}.*is {size} bytes.*must be {3 * 16 * 16 * 2}"):
        reader[1, ..., 0:4, 0:4]
    _same(reader[2, ..., 0:4, 0:4], np.asarray(arr[2, ..., 0:4, 0:4]))  # other tiles still read


def test_open_maps_are_bounded_and_not_pickled(tmp_path: Path) -> None:
    arr = _array(tmp_path, "uint16", (5, 3, 16, 16))
    reader = ChunkCropReader(arr, max_open=2)
    for t in range(5):
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


def test_patch_dataset_on_a_compressed_store_reads_as_before(tmp_path: Path) -> None:
    path = prepare_store(_TinyLayout(str(tmp_path)), tmp_path / "lz4.zarr", 32, "lz4", progress=False)
    fast = PatchDataset(str(path), "train", 16, train=True, patches_per_tile=2)
    slow = PatchDataset(str(path), "train", 16, train=True, patches_per_tile=2, chunk_memmap=False)
    assert not any(isinstance(r, ChunkCropReader) for r in (fast._open()[k] for k in ("image", "series", "label")))
    for i in range(len(fast)):
        _check_same(fast[i], slow[i])


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
        assert all(isinstance(handles[k], ChunkCropReader) for k in ("image", "series", "label"))
        assert isinstance(handles["series_dates"], ChunkCropReader)  # dates follow the store's compressor (none)
        for i in range(len(fast)):
            _check_same(fast[i], slow[i])


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
