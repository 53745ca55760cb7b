"""Tiles of store arrays read straight from their chunk bytes; zarr only for layouts this module does not know.

Every store array keeps one tile per chunk: `(1, *tile_shape)` chunks, either one object per tile or, with
`dataset.tiles_per_shard=N`, zarr v3's sharding codec with N tiles per object (an index of N (offset, length)
pairs at the end of the object). Each chunk is `bytes` (+ optional zstd / blosc) + `crc32c` (zarr v3 codecs).

Why not zarr's own read: zarr decodes the whole chunk through its async pipeline with ~0.3 ms of fixed cost per
read; for an uncompressed chunk on local disk a crop is a slice of a memory map of the file, several times
faster per core (benchmarks/results/data_throughput.md). The same holds for a tile inside a local shard, and for
a shard fetched into the read-through cache (chunk_cache.py), so sharded and remote stores keep that speed.

Where the bytes come from (a `source`, built by `PatchStore.object_source()`):
- `LocalObjects`: files of a local store, memory-mapped;
- `CachedObjects`: whole objects of a remote store fetched into `dataset.cache_dir` (checked before they are
  installed), then memory-mapped like local files;
- `RemoteObjects`: byte ranges of a remote store (no cache): the shard index once per object and process, then
  one ranged GET per tile; every fetched chunk's checksum is checked.

Damage is never read as data: a tile the store marks written whose chunk (file, object or shard-index entry) is
missing, a chunk of the wrong size and a checksum mismatch are `DataError`s naming the store, array and tile.
Checksums of memory-mapped chunks are checked when `verify=True` (once per tile and process); by default training
instead checks a local store once per machine (`prepare ... verify=deep`, cached), since a checksum costs about
as much as reading the whole tile while a crop reads a part of it (benchmarks/results/store_throughput.md).

Memory maps are opened lazily, kept in a small per-process LRU (each holds a file descriptor), never pickled,
and re-opened after a fork, so readers are safe in DataLoader workers under fork, spawn and forkserver.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from segplat.data.chunk_cache import ReadThroughCache, touch
from segplat.errors import DataError

DEFAULT_MAX_OPEN = 32  # memory maps kept open per array and process
IN_MEMORY_BYTES = 4 << 20  # arrays zarr must decode, up to this size, are read whole once per process
EMPTY = 2**64 - 1  # a shard index entry of a chunk that was never written
_DECOMPRESSORS: dict[type, Callable[[], Any]] = {ZstdCodec: numcodecs.Zstd, BloscCodec: numcodecs.Blosc}


# -- what an array's bytes look like --------------------------------------------------------------------------
@dataclass(frozen=True)
class TileLayout:
    """How the tiles of one array are stored: which object holds tile t, where in it, and how it is encoded."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file_dtype: np.dtype
    tiles_per_object: int  # 1: one object per tile; N: a shard of N tiles
    decompressor: Any
    checksum: bool
    index_checksum: bool
    index_at_start: bool
    encoding: Any

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunk_shape) * self.dtype.itemsize

    @property
    def sharded(self) -> bool:
        return self.tiles_per_object > 1

    @property
    def index_nbytes(self) -> int:
        return self.tiles_per_object * 16 + 4 * self.index_checksum

    def object_of(self, tile: int) -> tuple[str, int]:
        """(object key relative to the store root, position of the tile inside it)."""
        obj, local = divmod(tile, self.tiles_per_object)
        key = self.encoding.encode_chunk_key((obj,) + (0,) * (len(self.shape) - 1))
        return f"{self.path}/{key}", local

    def object_index(self, key: str) -> int:
        """The leading chunk (or shard) coordinate of an object key of this array."""
        return int(re.findall(r"\d+", key[len(self.path) + 1:])[0])

    def tiles_of(self, key_index: int) -> range:
        start = key_index * self.tiles_per_object
        return range(start, min(start + self.tiles_per_object, self.shape[0]))


def _codec_chain(codecs: tuple) -> tuple[str | None, Any, bool] | str:
    """(endian, decompressor, checksum) of `bytes [+ zstd|blosc] [+ crc32c]`, or why the chain is not that."""
    names = [type(c).__name__ for c in codecs]
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return f"codecs {names} do not start with bytes"
    rest = list(codecs[1:])
    checksum = bool(rest) and isinstance(rest[-1], Crc32cCodec)
    if checksum:
        rest.pop()
    if len(rest) > 1 or (rest and type(rest[0]) not in _DECOMPRESSORS):
        return f"codecs {names} are not bytes [+ zstd|blosc] [+ crc32c]"
    endian = codecs[0].endian.value if codecs[0].endian is not None else None
    return endian, (_DECOMPRESSORS[type(rest[0])]() if rest else None), checksum


def tile_layout(array: zarr.Array) -> TileLayout | str:
    """The array's TileLayout, or why it cannot be read here (then zarr reads it)."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3:
        return "not a zarr v3 array"
    if getattr(meta, "storage_transformers", ()):
        return "storage transformers"
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biufc" or dtype.hasobject or dtype.fields is not None:
        return f"dtype {dtype} is not a fixed-size numeric type"
    outer = getattr(meta.chunk_grid, "chunk_shape", None)
    if outer is None or len(array.shape) < 1:
        return "chunk grid is not regular"
    tile_chunk = (1, *array.shape[1:])
    codecs = tuple(meta.codecs)
    per_object, index_checksum, index_at_start = 1, False, False
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        shard = codecs[0]
        if tuple(shard.chunk_shape) != tile_chunk or tuple(outer)[1:] != tile_chunk[1:]:
            return f"shards {tuple(outer)} of chunks {tuple(shard.chunk_shape)} are not whole tiles {tile_chunk}"
        index = _codec_chain(tuple(shard.index_codecs))
        if isinstance(index, str) or index[1] is not None or index[0] not in (None, "little"):
            return "shard index codecs are not bytes (little endian) [+ crc32c]"
        per_object, index_checksum = int(outer[0]), index[2]
        index_at_start = shard.index_location.value == "start"
        codecs = tuple(shard.codecs)
    elif tuple(outer) != tile_chunk:
        return f"chunks {tuple(outer)} are not one leading index by the full extent {tuple(array.shape[1:])}"
    chain = _codec_chain(codecs)
    if isinstance(chain, str):
        return chain
    endian, decompressor, checksum = chain
    file_dtype = dtype
    if dtype.itemsize > 1 and endian is not None:
        file_dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return TileLayout(array.path, tuple(array.shape), dtype, file_dtype, per_object, decompressor, checksum,
                      index_checksum, index_at_start, meta.chunk_key_encoding)


def fast_path_problem(array: zarr.Array) -> str | None:
    """Why `array` cannot be read from its chunk bytes here, or None when it can."""
    layout = tile_layout(array)
    return layout if isinstance(layout, str) else None


# -- where the bytes come from ----------------------------------------------------------------------------------
class LocalObjects:
    """Objects are files under a local store folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def file(self, key: str, check: Callable[[str, bytes], None] | None = None) -> Path | None:
        return self.root / key


class CachedObjects:
    """Whole objects of a remote store, fetched into the local read-through cache."""

    def __init__(self, cache: ReadThroughCache) -> None:
        self.cache = cache

    def file(self, key: str, check: Callable[[str, bytes], None] | None = None) -> Path | None:
        path = self.cache.file(key, check)
        if path is not None:
            touch(path)
        return path


class RemoteObjects:
    """Byte ranges of objects of a remote store, read through its client (an ObjectAccess)."""

    def __init__(self, access_factory: Callable[[], Any]) -> None:
        self.access_factory = access_factory
        self._access = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"access_factory": self.access_factory, "_access": None, "_pid": None}

    def get(self, key: str, byte_range: Any = None) -> bytes | None:
        if self._access is None or self._pid != os.getpid():  # clients are never used across a fork
            self._access, self._pid = self.access_factory(), os.getpid()
        return self._access.get(key, byte_range)


# -- reading -------------------------------------------------------------------------------------------------------
class _Mapped:
    """One memory-mapped object and, for a shard, its parsed index."""

    __slots__ = ("data", "index", "path")

    def __init__(self, data: np.ndarray, index: np.ndarray | None, path: Path) -> None:
        self.data, self.index, self.path = data, index, path


class TileReader:
    """Index like the zarr array (`reader[tile, ..., y0:y1, x0:x1]`); reads the tile's chunk bytes directly."""

    def __init__(self, array: zarr.Array, source: LocalObjects | CachedObjects | RemoteObjects, store_name: str = "",
                 verify: bool = False, max_open: int = DEFAULT_MAX_OPEN) -> None:
        layout = tile_layout(array)
        if isinstance(layout, str):
            raise ValueError(f"{array.path}: {layout}")
        self.array = array
        self.layout = layout
        self.source = source
        self.store_name = store_name or str(array.store_path.store)
        self.verify = bool(verify)
        self.shape = layout.shape
        self.dtype = layout.dtype
        self.fill_value = np.array(array.fill_value, dtype=self.dtype)
        self.chunk_shape = layout.chunk_shape
        self.max_open = int(max_open)
        self._reset()

    def _reset(self) -> None:
        self._maps: OrderedDict[str, _Mapped | None] = OrderedDict()
        self._indexes: dict[str, np.ndarray | None] = {}
        self._verified: set[int] = set()
        self._pid: int | None = os.getpid()

    # -- pickling / fork: memory maps and clients stay in the process that opened them -----------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_maps=OrderedDict(), _indexes={}, _verified=set(), _pid=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    # -- errors ---------------------------------------------------------------------------------------------------
    def _damaged(self, tile: int, what: str) -> DataError:
        return DataError(f"store {self.store_name}: {self.layout.path} tile {tile} {what}; the store is damaged: "
                         "delete it and run `python -m segplat.prepare` again (or with force=true).")

    # -- bytes ----------------------------------------------------------------------------------------------------
    def _parse_index(self, raw: np.ndarray | bytes, key: str, tile: int) -> np.ndarray:
        raw = np.frombuffer(raw, dtype=np.uint8)
        if raw.size != self.layout.index_nbytes:
            raise self._damaged(tile, f"has a shard index of {raw.size} bytes in {key} (expected "
                                      f"{self.layout.index_nbytes})")
        body = raw[:self.layout.tiles_per_object * 16]
        if self.layout.index_checksum and google_crc32c.value(body) != int(raw[-4:].view("<u4")[0]):
            raise self._damaged(tile, f"has a shard index in {key} whose checksum does not match")
        return body.view("<u8").reshape(-1, 2)

    def _mapped(self, key: str, tile: int) -> _Mapped | None:
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        path = self.source.file(key, self.check_object)
        mapped = None
        if path is not None:
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size  # the size of the file we map, not of whatever the path is now
                    # np.ndarray over mmap: np.memmap without its Python overhead; the array keeps the map alive
                    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except FileNotFoundError:
                pass  # reported by the caller, which knows the tile
            except OSError as err:
                raise DataError(f"{path} cannot be read ({err.strerror or err}); check the store's permissions and "
                                "disk, or delete it and run `python -m segplat.prepare` again.") from err
            else:
                data = np.frombuffer(buffer, dtype=np.uint8)
                index = None
                if self.layout.sharded:
                    n = self.layout.index_nbytes
                    if data.size < n:
                        raise self._damaged(tile, f"is in {path}, which is {data.size} bytes, too short for its index")
                    index = self._parse_index(data[:n] if self.layout.index_at_start else data[-n:], key, tile)
                mapped = _Mapped(data, index, Path(path))
        self._maps[key] = mapped
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return mapped

    def _remote_chunk(self, key: str, local: int, tile: int) -> np.ndarray | None:
        source: RemoteObjects = self.source  # type: ignore[assignment]
        if not self.layout.sharded:
            raw = source.get(key)
            return None if raw is None else np.frombuffer(raw, dtype=np.uint8)
        if key not in self._indexes:
            n = self.layout.index_nbytes
            raw = source.get(key, RangeByteRequest(0, n) if self.layout.index_at_start else SuffixByteRequest(n))
            self._indexes[key] = None if raw is None else self._parse_index(raw, key, tile)
        index = self._indexes[key]
        if index is None:
            return None
        offset, length = (int(v) for v in index[local])
        if offset == EMPTY:
            return None
        raw = source.get(key, RangeByteRequest(offset, offset + length))
        return None if raw is None else np.frombuffer(raw, dtype=np.uint8)

    def _encoded(self, tile: int) -> tuple[np.ndarray, bool]:
        """(the tile's encoded chunk bytes, whether they were fetched just now); DataError when missing."""
        key, local = self.layout.object_of(tile)
        if isinstance(self.source, RemoteObjects):
            raw = self._remote_chunk(key, local, tile)
            fresh = True
        else:
            mapped = self._mapped(key, tile)
            raw = None
            if mapped is not None:
                if mapped.index is None:
                    raw = mapped.data
                else:
                    offset, length = (int(v) for v in mapped.index[local])
                    if offset != EMPTY:
                        if offset + length > mapped.data.size:
                            raise self._damaged(tile, f"points past the end of {mapped.path}")
                        raw = mapped.data[offset:offset + length]
            fresh = False
        if raw is None:
            where = "shard index entry" if self.layout.sharded else "chunk"
            raise self._damaged(tile, f"has no {where} ({key}) although the store marks it written")
        return raw, fresh

    def decode(self, tile: int, raw: np.ndarray, verify: bool) -> np.ndarray:
        """The tile as an array (a view of `raw` when uncompressed), after the checksum check when `verify`."""
        payload = raw
        if self.layout.checksum:
            if raw.size < 4:
                raise self._damaged(tile, f"has a chunk of {raw.size} bytes")
            payload = raw[:-4]
            if verify and google_crc32c.value(payload) != int(raw[-4:].view("<u4")[0]):
                raise self._damaged(tile, "has a chunk whose checksum does not match its bytes")
        if self.layout.decompressor is not None:
            try:
                payload = np.frombuffer(self.layout.decompressor.decode(payload), dtype=np.uint8)
            except Exception as err:
                raise self._damaged(tile, f"has a chunk that does not decompress ({type(err).__name__})") from err
        if payload.size != self.layout.chunk_nbytes:
            raise self._damaged(tile, f"has a chunk of {payload.size} bytes; {self.chunk_shape} "
                                      f"{self.dtype} needs {self.layout.chunk_nbytes}")
        return payload.view(self.layout.file_dtype).reshape(self.chunk_shape)

    def chunk(self, tile: int) -> np.ndarray:
        """The whole tile (read-only; a view of the map when the chunk is uncompressed and local)."""
        if self._pid != os.getpid():  # forked: the parent's maps are not ours to keep using
            self._reset()
        raw, fresh = self._encoded(tile)
        verify = fresh or (self.verify and tile not in self._verified)
        out = self.decode(tile, raw, verify and self.layout.checksum)
        if verify and not fresh:
            self._verified.add(tile)
        return out

    def check_object(self, key: str, data: bytes) -> None:
        """Check every chunk of a fetched object (shard index, presence, checksums) before it is cached."""
        raw = np.frombuffer(data, dtype=np.uint8)
        obj = self.layout.object_index(key)
        if not self.layout.sharded:
            self.decode(obj, raw, self.layout.checksum)
            return
        tiles = self.layout.tiles_of(obj)
        n = self.layout.index_nbytes
        index = self._parse_index(raw[:n] if self.layout.index_at_start else raw[-n:], key, tiles.start)
        for local, tile in enumerate(tiles):
            offset, length = (int(v) for v in index[local])
            if offset == EMPTY:
                continue  # unwritten tiles (skipped samples) are allowed; the reader refuses them when asked for
            if offset + length > raw.size:
                raise self._damaged(tile, f"points past the end of {key}")
            self.decode(tile, raw[offset:offset + length], self.layout.checksum)

    # -- indexing ------------------------------------------------------------------------------------------------
    def _fast_key(self, key: Any) -> tuple[int, tuple] | None:
        """(tile, rest) for keys a tile slice answers exactly like zarr, else None."""
        if not isinstance(key, tuple):
            key = (key,)
        if not key or isinstance(key[0], bool) or not isinstance(key[0], int | np.integer):
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
        return np.array(self.chunk(tile)[rest], dtype=self.dtype)  # a plain, writable, native-order copy of the crop


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


def crop_reader(array: zarr.Array, source: LocalObjects | CachedObjects | RemoteObjects | None = None,
                store_name: str = "", verify: bool = False, max_open: int = DEFAULT_MAX_OPEN,
                in_memory_bytes: int = IN_MEMORY_BYTES) -> TileReader | InMemoryArray | zarr.Array:
    """How to read `array` in this process: from its chunk bytes when their layout is known (memory maps for local
    files), else whole into memory when it is at most `in_memory_bytes`, else through zarr itself.

    Without `source`, arrays of a local file store read their files; arrays of any other store go to zarr."""
    if source is None:
        store = array.store_path.store
        source = LocalObjects(store.root) if isinstance(store, zarr.storage.LocalStore) else None
    if source is not None and fast_path_problem(array) is None:
        return TileReader(array, source, store_name, verify, max_open)
    if array.nbytes <= in_memory_bytes:
        return InMemoryArray(array)
    return array


ChunkCropReader = TileReader  # the name of the memory-map reader before sharded and remote stores
