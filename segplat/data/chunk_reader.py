"""Crops of uncompressed store arrays read straight from the chunk files through a memory map.

A store written with `dataset.compressor=none` keeps every tile as one chunk whose file is the tile's
bytes in C order (zarr v3 `bytes` codec). zarr would still read and decode the whole chunk through its
async codec pipeline for a 256x256 crop of a 512x512 tile; slicing a `np.memmap` of the file instead
copies only the crop, which is what makes the store path several times faster per core than windowed
GeoTIFF reads (benchmarks/results/data_throughput.md).

`crop_reader(array)` decides once per array whether the fast path applies, and otherwise returns the
zarr array itself, so callers index either the same way. The fast path applies only when everything the
bytes on disk depend on is known and simple: a zarr v3 array on a local file store, a regular chunk grid
with one leading index per chunk and the full extent of every other axis, exactly one codec (`bytes`),
no storage transformers and a fixed-size numeric or bool dtype. Compressed arrays, sharding, checksums,
transposes, remote or in-memory stores all keep the normal zarr read, except that small arrays (a
temporal stream's dates) are read whole once per process and served from memory.

Memory maps (`mmap` + `np.ndarray`, which is `np.memmap` without its per-call Python overhead) are opened
lazily, kept in a small per-process LRU (each holds a file descriptor), never pickled, and re-opened after
a fork, so readers are safe in DataLoader workers under fork, spawn and
forkserver.
"""

from __future__ import annotations

import math
import mmap
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from segplat.errors import DataError

DEFAULT_MAX_OPEN = 32  # memory maps kept open per array and process
IN_MEMORY_BYTES = 4 << 20  # compressed arrays up to this size are read whole, once per process


def _local_root(array: zarr.Array) -> Path | None:
    """The folder of a local file store, or None for any other store (remote, memory, zip)."""
    store = array.store_path.store
    if not isinstance(store, zarr.storage.LocalStore):
        return None
    return Path(store.root)


def fast_path_problem(array: zarr.Array) -> str | None:
    """Why `array` cannot be read through chunk memory maps, or None when it can."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3:
        return "not a zarr v3 array"
    if _local_root(array) is None:
        return f"store {type(array.store_path.store).__name__} is not a local file store"
    if getattr(meta, "storage_transformers", ()):
        return "storage transformers"
    codecs = tuple(meta.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return f"codecs {[type(c).__name__ for c in codecs]} are not a single bytes codec"
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biufc" or dtype.hasobject or dtype.fields is not None:
        return f"dtype {dtype} is not a fixed-size numeric type"
    grid = meta.chunk_grid
    chunks = getattr(grid, "chunk_shape", None)
    if chunks is None or len(array.shape) < 1:
        return "chunk grid is not regular"
    if tuple(chunks) != (1, *array.shape[1:]):
        return f"chunks {tuple(chunks)} are not one leading index by the full extent {tuple(array.shape[1:])}"
    return None


class ChunkCropReader:
    """Index like the zarr array (`reader[tile, ..., y0:y1, x0:x1]`), read from the tile's chunk file."""

    def __init__(self, array: zarr.Array, max_open: int = DEFAULT_MAX_OPEN) -> None:
        problem = fast_path_problem(array)
        if problem is not None:
            raise ValueError(f"{array.path}: {problem}")
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        endian = array.metadata.codecs[0].endian
        self.file_dtype = self.dtype
        if self.dtype.itemsize > 1 and endian is not None:
            self.file_dtype = self.dtype.newbyteorder("<" if endian.value == "little" else ">")
        self.fill_value = np.array(array.fill_value, dtype=self.dtype)
        self.chunk_shape = self.shape[1:]
        self.chunk_bytes = math.prod(self.chunk_shape) * self.dtype.itemsize
        self.root = _local_root(array)
        self.array_dir = self.root / array.store_path.path if array.store_path.path else self.root
        self.encoding = array.metadata.chunk_key_encoding
        self.max_open = int(max_open)
        self._maps: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._pid = os.getpid()

    # -- pickling / fork: memory maps stay in the process that opened them --------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    # -- reading --------------------------------------------------------------------------------------
    def chunk_path(self, tile: int) -> Path:
        key = self.encoding.encode_chunk_key((tile,) + (0,) * (len(self.shape) - 1))
        return self.array_dir / key

    def _chunk(self, tile: int) -> np.ndarray | None:
        """The tile's chunk as a read-only array view of its file; None when the chunk was never written."""
        if self._pid != os.getpid():  # forked: the parent's maps are not ours to keep using
            self._maps = OrderedDict()
            self._pid = os.getpid()
        if tile in self._maps:
            self._maps.move_to_end(tile)
            return self._maps[tile]
        path = self.chunk_path(tile)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size  # the size of the file we map, not of whatever the path is now
                if size != self.chunk_bytes:
                    raise DataError(f"{path} is {size} bytes but a chunk of {self.array.path} {self.chunk_shape} "
                                    f"{self.dtype} must be {self.chunk_bytes}; the store is damaged, delete it and "
                                    "run `python -m segplat.prepare` again.")
                # np.memmap without its Python overhead (half the cost of an uncached read); the array keeps the
                # map alive and it is unmapped once evicted here and no longer viewed
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except FileNotFoundError:
            view = None  # zarr leaves chunks that equal the fill value unwritten
        except OSError as err:
            raise DataError(f"{path} cannot be read ({err.strerror or err}); check the store's permissions and "
                            "disk, or delete it and run `python -m segplat.prepare` again.") from err
        else:
            view = np.ndarray(self.chunk_shape, dtype=self.file_dtype, buffer=buffer)
        self._maps[tile] = view
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return view

    def _fast_key(self, key: Any) -> tuple[int, tuple] | None:
        """(tile, rest) for keys the memory map answers exactly like zarr, else None."""
        if not isinstance(key, tuple):
            key = (key,)
        if not key or isinstance(key[0], bool) or not isinstance(key[0], (int, np.integer)):
            return None
        tile = int(key[0])
        if tile < 0:
            tile += self.shape[0]
        if not 0 <= tile < self.shape[0]:
            return None  # zarr raises its own bounds error
        rest = key[1:]
        for k in rest:
            if k is Ellipsis:
                continue
            if not isinstance(k, slice) or k.step not in (None, 1):
                return None
        if sum(k is Ellipsis for k in rest) > 1 or sum(k is not Ellipsis for k in rest) > len(self.chunk_shape):
            return None
        return tile, rest

    def __getitem__(self, key: Any) -> np.ndarray:
        fast = self._fast_key(key)
        if fast is None:
            return np.asarray(self.array[key])
        tile, rest = fast
        chunk = self._chunk(tile)
        if chunk is None:
            return np.array(np.broadcast_to(self.fill_value, self.chunk_shape)[rest])
        return np.array(chunk[rest], dtype=self.dtype)  # a plain, writable, native-order copy of the crop only


class InMemoryArray:
    """A small array read whole once per process; indexing returns copies, as a zarr read does.

    For the per-tile side arrays (a temporal stream's dates, (N, T) int32): zarr spends ~0.3 ms of
    fixed overhead on every read however small, more than the memory-mapped crop next to it."""

    def __init__(self, array: zarr.Array) -> None:
        self.path = array.path
        self.data = np.asarray(array[...])
        self.shape, self.dtype = self.data.shape, self.data.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self.data[key])


def crop_reader(array: zarr.Array, max_open: int = DEFAULT_MAX_OPEN,
                in_memory_bytes: int = IN_MEMORY_BYTES) -> ChunkCropReader | InMemoryArray | zarr.Array:
    """How to read `array` in this process: memory maps when its chunks are raw tiles on local disk,
    else whole into memory when it is at most `in_memory_bytes`, else through zarr itself."""
    if fast_path_problem(array) is None:
        return ChunkCropReader(array, max_open)
    if array.nbytes <= in_memory_bytes:
        return InMemoryArray(array)
    return array
