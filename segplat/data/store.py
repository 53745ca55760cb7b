"""The zarr v3 patch store: every dataset is prepared once into this format, then read by PatchDataset.

A store lives in a local folder (default `NAME-FINGERPRINT.zarr` under `dataset.store_dir`) or under an S3
prefix (`dataset.store_uri=s3://bucket/prefix/NAME.zarr`, store_location.py). Layout (DESIGN.md):

    NAME-FINGERPRINT.zarr/            root attrs["segplat"]: format version, dataset, fingerprint,
                                      tile size, classes, palette, ignore index, modalities
                                      (bands, nodata, dtype, scale, ...), per-band stats (train split,
                                      valid pixels only: mean, std, p2, p98, count)
      train/ val/ test/ ...           one group per split, attrs["tiles"]: source file, CRS,
                                      transform and window of every tile
        <modality>  (N, C, h, w)      native dtype, one tile per chunk (temporal: (N, T, C, h, w)); with
                                      `tiles_per_shard=N` zarr v3 sharding puts N tiles in one object;
                                      every chunk ends in a crc32c checksum, and every written tile has
                                      its chunk (write_empty_chunks), so a missing one is damage
        <modality>_dates (N, T)       day offsets, temporal streams only; -1 marks padding
        label       (N, H, W) uint8   class index or the ignore index
        valid       (N, H, W) bool    False on padding and where every modality is no-data
        done        (N,) bool         resume bookkeeping: which tiles are written
      _SEGPLAT_COMPLETE.json          written last, with a build id; a local store is built as
                                      NAME.zarr.partial and renamed; a remote one is written in place
                                      and is incomplete until the marker exists. Either resumes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import uuid
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from segplat.data.chunk_cache import ReadThroughCache
from segplat.data.chunk_reader import CachedObjects, LocalObjects, RemoteObjects, TileReader, crop_reader
from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, check_label_values
from segplat.data.store_location import ObjectAccess, StoreLocation
from segplat.errors import DataError
from segplat.utils.io import atomic_write_json, dumps_json

log = logging.getLogger(__name__)
# samples skipped in a row, from the first one, for one reason naming a config key before the prepare stops: such a
# reason is most likely the configuration's, which would skip every sample, one warning each, before the same error
CONFIG_SKIPS_TO_STOP = 5

STORE_FORMAT_VERSION = 2  # 2: crc32c on every chunk, written-empty chunks, optional sharding
COMPLETE_MARKER = "_SEGPLAT_COMPLETE.json"
MAX_STAT_SAMPLES = 2_000_000  # per band; above this percentiles come from a seeded subsample
META_FLUSH_SECONDS = 5.0  # the tile table and done flags are saved at most this often (and at the end)


def compressor_codecs(name: str | None, checksum: bool = True) -> list[Any]:
    """Map a config name to zarr v3 bytes-to-bytes codecs, ending in a crc32c checksum (damage is detectable)."""
    tail = [zarr.codecs.Crc32cCodec()] if checksum else []
    if name in (None, "none"):
        return tail
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3), *tail]
    if name == "lz4":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle=zarr.codecs.BloscShuffle.shuffle), *tail]
    raise DataError(f"dataset.compressor={name!r} is not known; use one of none, zstd, lz4.")


def store_fingerprint(layout: Layout, tile_size: int, compressor: str | None = "none",
                      tiles_per_shard: int = 1) -> str:
    """The one definition of what makes two stores the same (layout, its source files, tiling, on-disk encoding,
    format): a file added, removed or rewritten under the root means another store, never a stale one."""
    extra: dict[str, Any] = {"tile_size": int(tile_size), "format": STORE_FORMAT_VERSION,
                             "compressor": compressor or "none", "sources": layout.sources_digest()}
    if int(tiles_per_shard) > 1:
        extra["tiles_per_shard"] = int(tiles_per_shard)
    return layout.fingerprint(extra)


def _written_splits(root: zarr.Group, splits: Iterable[str]) -> list[str]:
    """The splits of a store being written that hold at least one sample's tiles."""
    return [s for s in splits if s in root and any(m is not None for m in root[s].attrs["tiles"])]


class _ConfigSkips(DataError):
    """The first samples were all refused for one config-key reason: the prepare stops (see `_skip`)."""


@dataclass
class TilePlan:
    """Where the tiles of one sample go: its first index in the split's arrays and its tile windows."""

    ref: SampleRef
    start: int
    windows: list[tuple[int, int, int, int]]  # (row, col, height, width) in label pixels, unpadded part


def tile_windows(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping tiles covering the scene; the border tiles are padded later, never dropped."""
    rows = max(1, math.ceil(height / tile))
    cols = max(1, math.ceil(width / tile))
    out = []
    for r in range(rows):
        for c in range(cols):
            y, x = r * tile, c * tile
            out.append((y, x, min(tile, height - y), min(tile, width - x)))
    return out


def _nodata_mask(array: np.ndarray, nodata: float | None) -> np.ndarray:
    """True where a pixel has no data in every band (and every date): (H, W)."""
    if nodata is None:
        if np.issubdtype(array.dtype, np.floating):
            invalid = np.isnan(array)
        else:
            return np.zeros(array.shape[-2:], dtype=bool)
    elif isinstance(nodata, float) and math.isnan(nodata):
        invalid = np.isnan(array)
    else:
        invalid = array == nodata
        if np.issubdtype(array.dtype, np.floating):
            invalid |= np.isnan(array)
    axes = tuple(range(array.ndim - 2))
    return invalid.all(axis=axes)


def _resize_nearest_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    ys = (np.arange(shape[0]) * mask.shape[0] // shape[0]).clip(0, mask.shape[0] - 1)
    xs = (np.arange(shape[1]) * mask.shape[1] // shape[1]).clip(0, mask.shape[1] - 1)
    return mask[ys][:, xs]


def _fill_value(spec: ModalitySpec) -> Any:
    if spec.nodata is None:
        return 0
    if isinstance(spec.nodata, float) and math.isnan(spec.nodata):
        return float("nan")
    return spec.nodata


class _TileSink:
    """`sink[name][idx] = tile` for the writer: straight into the array, or, with shards, into a buffer of the
    current shard that is written whole when the writer moves past it (writing one tile into a shard rewrites
    the whole object, which for N tiles per shard would write N times the data). `on_persist(upto)` is told
    that every tile before `upto` is stored, which is when the samples holding them may be marked done."""

    def __init__(self, group: zarr.Group, tiles_per_shard: int, on_persist: Any) -> None:
        self.group = group
        self.per_shard = max(1, int(tiles_per_shard))
        self.on_persist = on_persist
        self.shard: int | None = None
        self.buffers: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> Any:
        sink = self

        class _Array:
            def __setitem__(self, idx: int, value: np.ndarray) -> None:
                sink.put(name, int(idx), value)

        return _Array()

    def put(self, name: str, idx: int, value: np.ndarray) -> None:
        if self.per_shard == 1:
            self.group[name][idx] = value
            return
        shard = idx // self.per_shard
        if shard != self.shard:
            self.flush()
            self.shard = shard
        start = shard * self.per_shard
        if name not in self.buffers:  # a resumed shard keeps the tiles an earlier run wrote into it
            arr = self.group[name]
            self.buffers[name] = np.array(arr[start:min(start + self.per_shard, arr.shape[0])])
        self.buffers[name][idx - start] = value

    def flush(self) -> None:
        if self.shard is None:
            return
        start = self.shard * self.per_shard
        for name, buf in self.buffers.items():
            self.group[name][start:start + len(buf)] = buf
        upto = start + self.per_shard
        self.shard, self.buffers = None, {}
        self.on_persist(upto)


class StoreWriter:
    """Writes a layout into a store; resumable (done flags) and verified against the layout's shapes.

    Local stores are built as `NAME.zarr.partial` and renamed; remote ones are written in place, the completion
    marker last. Either way an interrupted run resumes: samples marked done (their tiles stored) are not
    written again."""

    def __init__(
        self,
        layout: Layout,
        path: str | Path | StoreLocation,
        tile_size: int,
        compressor: str | None = "none",
        progress: bool = True,
        tiles_per_shard: int = 1,
    ) -> None:
        self.layout = layout
        self.location = StoreLocation.parse(path)
        self.tile_size = int(tile_size)
        self.compressor = compressor
        self.tiles_per_shard = max(1, int(tiles_per_shard or 1))
        self.fingerprint = store_fingerprint(layout, self.tile_size, compressor, self.tiles_per_shard)
        self.progress = progress
        self.skipped: list[str] = []
        self._read_ok = False  # some sample has been read: a repeated skip is then the files', not the config's
        self._same_reason: tuple[str, int] = ("", 0)
        # where the tiles are written: a local partial folder renamed at the end, or the remote prefix itself
        self.target = self.location if self.location.remote else self.location.with_suffix(".partial")

    @property
    def path(self) -> Path:
        return self.location.path

    @property
    def partial(self) -> Path:
        return self.target.path

    # -- public ---------------------------------------------------------------------------------
    def run(self) -> Path | str:
        if is_complete(self.location, self.fingerprint):
            log.info("store %s is complete (fingerprint %s)", self.location, self.fingerprint)
            return self._result()
        # every written tile gets its chunk even when it equals the fill value (a run-time setting of zarr, not
        # stored with the array), so that a missing chunk always means damage
        with zarr.config.set({"array.write_empty_chunks": True}):
            return self._build()

    def _build(self) -> Path | str:
        started = time.time()
        splits = self.layout.scanned()
        if not any(splits.values()):
            raise DataError(f"no samples found under {self.layout.root} for dataset {self.layout.name}; "
                            "check dataset.root.")
        root = self._open_partial()
        try:
            for split, refs in splits.items():
                if refs:
                    self._write_split(root, split, refs)
        except _ConfigSkips as err:
            if not self.location.remote and not _written_splits(root, splits):
                shutil.rmtree(self.partial, ignore_errors=True)  # nothing in it is worth resuming
            raise DataError(str(err)) from None
        written = _written_splits(root, splits)
        if not written:
            shutil.rmtree(self.partial, ignore_errors=True)  # nothing in it is worth resuming
            first = self.skipped[0].rstrip(".") if self.skipped else "no sample has a tile"
            raise DataError(f"every one of the {sum(len(r) for r in splits.values())} samples of dataset "
                            f"{self.layout.name} under {self.layout.root} was skipped (the log names each; the first: "
                            f"{first}).")
        try:
            stats = self._compute_stats(root, "train" if "train" in written else written[0])
        except DataError:
            shutil.rmtree(self.partial, ignore_errors=True)  # a dead modality: the store must be rebuilt
            raise
        meta = dict(root.attrs["segplat"])
        meta["stats"] = stats
        meta["skipped"] = self.skipped
        meta["notes"] = [str(n) for n in getattr(self.layout, "notes", [])]
        root.attrs["segplat"] = meta
        counts = {s: len({m["source"] for m in root[s].attrs["tiles"] if m is not None}) for s in written}
        marker = {"fingerprint": self.fingerprint, "format": STORE_FORMAT_VERSION, "build": uuid.uuid4().hex[:12],
                  "seconds": round(time.time() - started, 1), "skipped": len(self.skipped)}
        if self.location.remote:  # the marker is the last object written: without it the store is incomplete
            ObjectAccess(self.location, read_only=False).put(COMPLETE_MARKER, dumps_json(marker).encode())
        else:
            atomic_write_json(self.partial / COMPLETE_MARKER, marker)
            if self.path.exists():
                stale = self.path.with_name(self.path.name + f".stale-{int(time.time())}")
                self.path.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            self.partial.rename(self.path)
        log.info("prepared %s: samples written per split %s, skipped %d", self.location, counts, len(self.skipped))
        return self._result()

    def _result(self) -> Path | str:
        return self.location.uri if self.location.remote else self.path

    # -- internals ------------------------------------------------------------------------------
    def _open_group(self, mode: str) -> zarr.Group:
        return zarr.open_group(store=self.target.zarr_store(read_only=False), mode=mode, zarr_format=3)

    def _discard_target(self) -> None:
        if self.location.remote:
            access = ObjectAccess(self.location, read_only=False)
            access.delete(COMPLETE_MARKER)  # first: a half-deleted store must never look complete
            access.delete_all()
        elif self.partial.exists():
            shutil.rmtree(self.partial)

    def _open_partial(self) -> zarr.Group:
        resumable = read_marker(self.target) is None  # a remote store with a marker is complete, of another config
        if resumable:
            try:
                root = self._open_group("r+")
                if root.attrs.get("segplat", {}).get("fingerprint") == self.fingerprint:
                    log.info("resuming the unfinished store %s", self.target)
                    return root
            except DataError:
                raise
            except Exception:  # a missing or unreadable partial store is rebuilt, never trusted
                pass
        self._discard_target()
        if not self.location.remote:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
        root = self._open_group("w")
        root.attrs["segplat"] = {
            "format": STORE_FORMAT_VERSION,
            "dataset": self.layout.name,
            "fingerprint": self.fingerprint,
            "tile_size": self.tile_size,
            "classes": list(self.layout.classes),
            "palette": [list(c) for c in self.layout.palette],
            "ignore_index": int(self.layout.ignore_index),
            "modalities": {k: v.to_attrs() for k, v in self.layout.modalities.items()},
            "compressor": self.compressor or "none",
            "tiles_per_shard": self.tiles_per_shard,
        }
        return root

    def _plan(self, refs: list[SampleRef], shapes: list[tuple[int, int]]) -> list[TilePlan]:
        plans, start = [], 0
        for ref, (h, w) in zip(refs, shapes):
            windows = tile_windows(h, w, self.tile_size) if h > 0 and w > 0 else []  # [] = skipped at scan
            plans.append(TilePlan(ref, start, windows))
            start += len(windows)
        return plans

    def _create_arrays(self, root: zarr.Group, split: str, n_tiles: int, n_samples: int) -> None:
        """One array per modality (+ dates), label and valid: one tile per chunk, N tiles per shard if asked,
        every chunk checksummed and written even when it equals the fill value (so a missing one is damage)."""
        t = self.tile_size
        codecs = compressor_codecs(self.compressor)
        group = root.create_group(split)
        per = self.tiles_per_shard

        def create(name: str, shape: tuple[int, ...], dtype: str, fill: Any) -> None:
            chunks = (1, *shape[1:])
            shards = (min(per, n_tiles), *shape[1:]) if per > 1 else None
            group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill,
                               compressors=codecs)

        for name, spec in self.layout.modalities.items():
            mt = round(t * spec.scale)
            if spec.temporal:
                shape = (n_tiles, spec.max_time, len(spec.bands), mt, mt)
                create(f"{name}_dates", (n_tiles, spec.max_time), "int32", -1)
            else:
                shape = (n_tiles, len(spec.bands), mt, mt)
            create(name, shape, spec.dtype, _fill_value(spec))
        create("label", (n_tiles, t, t), "uint8", self.layout.ignore_index)
        create("valid", (n_tiles, t, t), "bool", False)
        group.create_array("done", shape=(n_samples,), chunks=(n_samples,), dtype="bool", fill_value=False)
        group.attrs["tiles"] = [None] * n_tiles

    def _skip(self, err: DataError) -> None:
        """Skip one sample, logged; stop when the first samples all fail for one reason that names a config key."""
        self.skipped.append(str(err))
        log.warning("skipped: %s", err)
        reason = re.sub(r"^\S+: ", "", str(err))  # the message without the file it names
        if self._read_ok or "dataset." not in reason:
            return
        count = self._same_reason[1] + 1 if reason == self._same_reason[0] else 1
        self._same_reason = (reason, count)
        if count >= CONFIG_SKIPS_TO_STOP:
            raise _ConfigSkips(f"the first {count} samples of dataset {self.layout.name} were all refused for the "
                               f"same reason, which names a config key; stopped before reading the rest: {err}")

    def _scan_shapes(self, root: zarr.Group, split: str, refs: list[SampleRef]) -> list[list[int]]:
        """Each sample's label shape, scanned once and kept in the store's attributes so a resumed prepare plans
        the same tiles; an unreadable file skips its sample (shape 0 x 0), not the whole prepare."""
        shapes_path = f"{split}_shapes"
        shapes = root.attrs.get(shapes_path)
        if shapes is None:
            shapes = []
            for ref in tqdm(refs, desc=f"scan {split}", disable=not self.progress, leave=False):
                try:
                    shapes.append(list(self._sample_shape(ref)))
                except DataError as err:
                    self._skip(err)
                    shapes.append([0, 0])
            root.attrs[shapes_path] = shapes
        return list(shapes)

    def _write_split(self, root: zarr.Group, split: str, refs: list[SampleRef]) -> None:
        shapes = self._scan_shapes(root, split, refs)
        plans = self._plan(refs, [tuple(s) for s in shapes])
        n_tiles = plans[-1].start + len(plans[-1].windows)
        if n_tiles == 0:
            return
        if split not in root:
            self._create_arrays(root, split, n_tiles, len(refs))
        group = root[split]
        done = group["done"][:]
        tiles_meta = list(group.attrs["tiles"])
        # a sample counts as written only when its tiles are stored and in the tile table: the table and the done
        # flags are saved together, and anything a crash left unrecorded is written again; skipped samples are
        # re-checked too, which rebuilds the skipped list of a resumed run
        todo = [i for i in range(len(plans)) if not done[i] or any(
            tiles_meta[plans[i].start + k] is None for k in range(len(plans[i].windows)))]
        pending: deque[int] = deque()  # samples whose tiles sit in an unwritten shard buffer, in tile order

        def persisted(upto: int) -> None:
            while pending and plans[pending[0]].start + len(plans[pending[0]].windows) <= upto:
                done[pending.popleft()] = True

        sink = _TileSink(group, self.tiles_per_shard, persisted)
        last_flush = time.monotonic()

        def flush_meta() -> None:
            group.attrs["tiles"] = tiles_meta
            group["done"][:] = done

        for i in tqdm(todo, desc=f"prepare {split}", disable=not self.progress, unit="sample"):
            plan = plans[i]
            if time.monotonic() - last_flush >= META_FLUSH_SECONDS:
                flush_meta()
                last_flush = time.monotonic()
            if not plan.windows:
                done[i] = True
                continue
            try:
                sample = self.layout.read(plan.ref)
                self._validate(sample, tuple(shapes[i]), plan.ref)
            except DataError as err:
                self._skip(err)
                done[i] = True
                continue
            self._read_ok = True
            for k, window in enumerate(plan.windows):
                idx = plan.start + k
                tiles_meta[idx] = self._write_tile(sink, idx, sample, window)
            if self.tiles_per_shard == 1:
                done[i] = True
            else:
                pending.append(i)
        sink.flush()
        flush_meta()

    def _sample_shape(self, ref: SampleRef) -> tuple[int, int]:
        shape_fn = getattr(self.layout, "label_shape", None)
        if shape_fn is not None:
            return tuple(shape_fn(ref))
        return tuple(self.layout.read(ref).label.shape)

    def _validate(self, sample: Sample, shape: tuple[int, int], ref: SampleRef | None = None) -> None:
        mods = self.layout.modalities
        if tuple(sample.label.shape) != shape:
            raise DataError(f"{sample.source}: label is {sample.label.shape} but was {shape} when the "
                            "dataset was scanned; the file changed during prepare.")
        for name, spec in mods.items():
            if name not in sample.arrays:
                raise DataError(f"{sample.source}: modality {name!r} is missing for this sample.")
            arr = sample.arrays[name]
            want = (round(shape[0] * spec.scale), round(shape[1] * spec.scale))
            if tuple(arr.shape[-2:]) != want:
                raise DataError(f"{sample.source}: {name} is {arr.shape[-1]}x{arr.shape[-2]} pixels but the "
                                f"label grid needs {want[1]}x{want[0]}; the modalities' sizes disagree.")
            if arr.shape[-3] != len(spec.bands):
                raise DataError(f"{sample.source}: {name} has {arr.shape[-3]} bands, expected {len(spec.bands)} "
                                f"({', '.join(spec.bands)}).")
        check_label_values(sample.label, len(self.layout.classes), self.layout.ignore_index, sample.source)
        for name, spec in mods.items():  # a modality with no data would train the model on a dead input
            if _nodata_mask(sample.arrays[name], spec.nodata).all():
                path = (ref.files.get(name) if ref is not None else None) or sample.source
                raise DataError(f"{path}: every pixel of {name} is no-data in this sample, so the sample was skipped "
                                "(replace the file or remove the sample).")

    def _write_tile(self, group: zarr.Group | _TileSink, idx: int, sample: Sample,
                    window: tuple[int, int, int, int]) -> dict[str, Any]:
        mods = self.layout.modalities
        t = self.tile_size
        y, x, h, w = window
        label = np.full((t, t), self.layout.ignore_index, dtype=np.uint8)
        label[:h, :w] = sample.label[y:y + h, x:x + w]
        has_data = np.zeros((t, t), dtype=bool)
        for name, spec in mods.items():
            s = spec.scale
            mt = round(t * s)
            ys, xs, hs, ws = round(y * s), round(x * s), max(1, round(h * s)), max(1, round(w * s))
            src = sample.arrays[name][..., ys:ys + hs, xs:xs + ws]
            tile = np.full((*src.shape[:-2], mt, mt), _fill_value(spec), dtype=spec.dtype)
            if spec.temporal:
                tile = np.full((spec.max_time, len(spec.bands), mt, mt), _fill_value(spec), dtype=spec.dtype)
                tt = min(src.shape[0], spec.max_time)
                tile[:tt, :, :src.shape[-2], :src.shape[-1]] = src[:tt]
                dates = np.full((spec.max_time,), -1, dtype=np.int32)
                d = sample.dates.get(name)
                if d is not None:
                    dates[:min(len(d), tt)] = d[:tt]
                group[f"{name}_dates"][idx] = dates
            else:
                tile[..., :src.shape[-2], :src.shape[-1]] = src
            group[name][idx] = tile
            valid_here = ~_nodata_mask(tile, spec.nodata)
            valid_here[src.shape[-2]:, :] = False
            valid_here[:, src.shape[-1]:] = False
            has_data |= _resize_nearest_mask(valid_here, (t, t))
        label[~has_data] = self.layout.ignore_index
        group["label"][idx] = label
        group["valid"][idx] = has_data
        return {"source": sample.source, "crs": sample.crs,
                "transform": list(sample.transform) if sample.transform is not None else None,
                "window": [y, x, h, w]}

    def _compute_stats(self, root: zarr.Group, split: str) -> dict[str, dict[str, list[float]]]:
        """Per-band mean, std, 2nd/98th percentiles over valid pixels only (float64 accumulation)."""
        group = root[split]
        rng = np.random.default_rng(0)
        out: dict[str, dict[str, list[float]]] = {}
        valid_all = _BlockReader(group["valid"], self.tiles_per_shard)
        n = valid_all.shape[0]
        for name, spec in self.layout.modalities.items():
            arr = _BlockReader(group[name], self.tiles_per_shard)
            c = len(spec.bands)
            total = np.zeros(c, np.float64)
            total_sq = np.zeros(c, np.float64)
            count = np.zeros(c, np.int64)
            reservoirs: list[list[np.ndarray]] = [[] for _ in range(c)]
            kept = np.zeros(c, np.int64)
            mt = round(valid_all.shape[-1] * spec.scale)
            for i in tqdm(range(n), desc=f"stats {name}", disable=not self.progress, leave=False):
                valid = _resize_nearest_mask(np.asarray(valid_all[i]), (mt, mt))
                if not valid.any():  # padding-only or skipped tiles carry no statistics
                    continue
                tile = np.asarray(arr[i])
                if spec.temporal:
                    tile = tile.transpose(1, 0, 2, 3).reshape(c, -1, *tile.shape[-2:])  # (C, T, h, w)
                    vals = tile.reshape(c, -1)
                else:
                    vals = tile.reshape(c, -1)
                vals = vals.astype(np.float64)
                ok = np.isfinite(vals)
                if spec.nodata is not None and not (isinstance(spec.nodata, float) and math.isnan(spec.nodata)):
                    ok &= vals != spec.nodata
                ok &= np.broadcast_to(valid, tile.shape).reshape(c, -1)  # padding is not data, whatever its value
                for b in range(c):
                    v = vals[b][ok[b]]
                    if v.size == 0:
                        continue
                    total[b] += v.sum()
                    total_sq[b] += np.square(v).sum()
                    count[b] += v.size
                    reservoirs[b].append(v.astype(np.float32) if v.size < MAX_STAT_SAMPLES else
                                         rng.choice(v, MAX_STAT_SAMPLES, replace=False).astype(np.float32))
                    kept[b] += v.size
                    if kept[b] > 4 * MAX_STAT_SAMPLES:  # keep memory bounded: subsample what we hold
                        merged = np.concatenate(reservoirs[b])
                        reservoirs[b] = [rng.choice(merged, MAX_STAT_SAMPLES, replace=False)]
                        kept[b] = MAX_STAT_SAMPLES
            if not count.all():
                dead = [spec.bands[b] for b in range(c) if count[b] == 0]
                which = f"band {dead[0]}" + (f" and {len(dead) - 1} more" if len(dead) > 1 else "")
                raise DataError(f"{name} has no valid pixel in the whole {split} split ({which}: every pixel is "
                                "no-data), so it can be neither normalised nor learnt from; check its nodata value, "
                                "its files and their overlap with the label, or leave the modality out.")
            mean = np.divide(total, np.maximum(count, 1))
            var = np.maximum(np.divide(total_sq, np.maximum(count, 1)) - mean**2, 0.0)
            p2, p98 = [], []
            for b in range(c):
                if reservoirs[b]:
                    pool = np.concatenate(reservoirs[b]).astype(np.float64)
                    lo, hi = np.percentile(pool, [2, 98])
                else:
                    lo = hi = 0.0
                p2.append(float(lo))
                p98.append(float(hi))
            out[name] = {"mean": mean.tolist(), "std": np.sqrt(var).tolist(), "p2": p2, "p98": p98,
                         "count": count.tolist()}
        return out


class _BlockReader:
    """`reader[i]` over consecutive tiles, read a block (a whole shard when sharded) at a time: one request per
    object on remote stores instead of one per tile and array, and no shard decoded once per tile."""

    def __init__(self, array: zarr.Array, tiles_per_shard: int, max_bytes: int = 256 << 20) -> None:
        self.array, self.shape = array, array.shape
        tile_bytes = max(1, math.prod(array.shape[1:]) * np.dtype(array.dtype).itemsize)
        per = max(1, int(tiles_per_shard))
        fits = max(1, max_bytes // tile_bytes)
        self.block = per * max(1, fits // per) if fits >= per else fits
        self.start, self.data = -1, None

    def __getitem__(self, i: int) -> np.ndarray:
        start = i - i % self.block
        if start != self.start:
            self.start, self.data = start, np.asarray(self.array[start:start + self.block])
        return self.data[i - start]


def read_marker(location: str | Path | StoreLocation) -> dict[str, Any] | None:
    """The completion marker's content, or None when the store is incomplete (or unreadable)."""
    location = StoreLocation.parse(location)
    if location.remote:
        data = ObjectAccess(location).get(COMPLETE_MARKER)
        text = None if data is None else data.decode(errors="replace")
    else:
        marker = location.path / COMPLETE_MARKER
        try:
            text = marker.read_text() if marker.is_file() else None
        except OSError:
            text = None
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def is_complete(location: str | Path | StoreLocation, fingerprint: str | None = None) -> bool:
    marker = read_marker(location)
    if marker is None:
        return False
    return fingerprint is None or marker.get("fingerprint") == fingerprint


def wait_until_complete(location: StoreLocation, fingerprint: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Wait for another process (the preparing rank) to write the store's completion marker."""
    deadline = time.monotonic() + float(timeout_s)
    while not is_complete(location, fingerprint):
        if time.monotonic() > deadline:
            raise DataError(f"waited {timeout_s:g} s for another process to prepare the store {location.uri} (no "
                            f"{COMPLETE_MARKER} with fingerprint {fingerprint} appeared); check the preparing rank's "
                            "log, raise dataset.prepare_timeout_s, or run `python -m segplat.prepare` for it first.")
        time.sleep(poll_s)


class PatchStore:
    """Read side of a store: metadata plus lazy access to the split groups (local or remote)."""

    def __init__(self, path: str | Path | StoreLocation) -> None:
        self.location = StoreLocation.parse(path)
        self.path: Path | str = self.location.uri if self.location.remote else self.location.path
        marker = read_marker(self.location)
        if marker is None:
            raise DataError(f"{self.location.uri} is not a complete segplat store (no {COMPLETE_MARKER}); "
                            "run `python -m segplat.prepare` for it again.")
        self.build = str(marker.get("build", ""))
        store = self.location.zarr_store(read_only=True)
        if self.location.remote and self.location.cache_dir:  # a warm open then costs one request: the marker
            store = _CachedMetadata(store, self._cache(RemoteObjects(partial(ObjectAccess, self.location)).get))
        self.root = zarr.open_group(store=store, mode="r", zarr_format=3)
        self.meta: dict[str, Any] = dict(self.root.attrs["segplat"])
        self._splits: list[str] | None = None

    @property
    def tile_size(self) -> int:
        return int(self.meta["tile_size"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self.meta["palette"]]

    @property
    def ignore_index(self) -> int:
        return int(self.meta["ignore_index"])

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {k: ModalitySpec.from_attrs(v) for k, v in self.meta["modalities"].items()}

    @property
    def stats(self) -> dict[str, dict[str, list[float]]]:
        return self.meta["stats"]

    @property
    def splits(self) -> list[str]:
        if self._splits is None:  # a listing, which on object storage is a request: once per open
            with warnings.catch_warnings():  # zarr warns about the marker file, which is ours
                warnings.simplefilter("ignore")
                self._splits = [name for name, _ in self.root.groups()]
        return self._splits

    def split(self, name: str) -> zarr.Group:
        try:
            group = self.root[name]  # no listing: on object storage that is one more request per open
        except KeyError:
            group = None
        if not isinstance(group, zarr.Group):
            raise DataError(f"{self.location.uri} has no split {name!r}; it has {', '.join(self.splits)}.")
        return group

    def num_tiles(self, split: str) -> int:
        return int(self.split(split)["label"].shape[0])

    def tiles_meta(self, split: str) -> list[dict[str, Any]]:
        return list(self.split(split).attrs["tiles"])

    def object_source(self, cache: bool = True) -> LocalObjects | CachedObjects | RemoteObjects:
        """Where tile readers get chunk bytes: local files, the read-through cache, or ranged reads."""
        if not self.location.remote:
            return LocalObjects(self.location.path)
        remote = RemoteObjects(partial(ObjectAccess, self.location))
        if cache and self.location.cache_dir:
            return CachedObjects(self._cache(remote.get))
        return remote

    def _cache(self, fetch: Any) -> ReadThroughCache:
        return ReadThroughCache(self.location.cache_dir, self.location.uri, self.build, self.location.cache_max_bytes,
                                fetch)

    def reader(self, split: str, name: str, verify: bool = False, cache: bool = True) -> Any:
        """A tile reader for one array (chunk_reader.crop_reader), named after this store in its errors."""
        return crop_reader(self.split(split)[name], self.object_source(cache), self.location.uri, verify)


class _CachedMetadata(zarr.storage.WrapperStore):
    """A remote store whose `zarr.json` documents are read through the read-through cache: they never change within
    a build (the marker's id, part of the cache folder), so only the marker is fetched on every open."""

    def __init__(self, store: zarr.abc.store.Store, cache: ReadThroughCache) -> None:
        super().__init__(store)
        self.cache = cache

    def _with_store(self, store: zarr.abc.store.Store) -> _CachedMetadata:
        return type(self)(store, self.cache)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is not None or not key.endswith("zarr.json"):
            return await self._store.get(key, prototype, byte_range)
        path = self.cache.root / key
        if path.is_file():
            return prototype.buffer.from_bytes(path.read_bytes())
        buf = await self._store.get(key, prototype)  # on zarr's loop: no thread may block waiting for it
        if buf is not None:
            self.cache.install(key, buf.to_bytes())
        return buf


def prepare_store(layout: Layout, path: str | Path | StoreLocation, tile_size: int, compressor: str | None = "none",
                  progress: bool = True, tiles_per_shard: int = 1) -> Path | str:
    """Write (or resume, or verify) the store for `layout` at `path`; returns its path (a URI when remote)."""
    return StoreWriter(layout, path, tile_size, compressor, progress, tiles_per_shard).run()


def iter_split_tiles(store: PatchStore, split: str) -> Iterable[int]:
    return range(store.num_tiles(split))


# -- verification ---------------------------------------------------------------------------------------------------
def _label_problem(label: np.ndarray, num_classes: int, ignore_index: int) -> int | None:
    """The first label value outside the classes and the ignore index, or None."""
    bad = label[(label >= num_classes) & (label != ignore_index)]
    return int(bad.flat[0]) if bad.size else None


def label_value_error(store_name: str, split: str, tile: int, value: int, num_classes: int,
                      ignore_index: int) -> DataError:
    return DataError(f"store {store_name}: {split}/label tile {tile} holds the value {value}, outside the "
                     f"{num_classes} classes (0-{num_classes - 1}) and the ignore index {ignore_index}; the store is "
                     "damaged or was written for other classes: delete it and run `python -m segplat.prepare` again.")


def verify_store(store: PatchStore, deep: bool = True, limit: int = 10) -> list[str]:
    """Problems of a store that claims to be complete (empty list = fine), at most `limit` of them.

    Always: every array has every tile, every sample was written, the tile table matches, and every written
    tile's chunk exists (file, object or shard-index entry). `deep` also reads every chunk of every written
    tile, checks its crc32c checksum and size, and checks every label value against the classes."""
    problems: list[str] = []
    uri = store.location.uri
    access = ObjectAccess(store.location) if store.location.remote else None
    k, ignore = len(store.classes), store.ignore_index

    def whole(key: str) -> bytes | None:
        if access is not None:
            return access.get(key)
        try:
            return (store.location.path / key).read_bytes()
        except FileNotFoundError:
            return None

    for split in store.splits:
        group = store.split(split)
        names = [name for name in group.array_keys() if name != "done"]
        meta = store.tiles_meta(split)
        structure = _split_structure_problems(store, split, group, names, len(meta))
        if structure:  # chunks of a split whose arrays or tile table are wrong are not worth reading
            return (problems + structure)[:limit]
        written = [i for i, m in enumerate(meta) if m is not None]
        for name in names:
            reader = crop_reader(group[name], store.object_source(cache=False), uri, verify=True)
            if not isinstance(reader, TileReader):
                continue  # a layout this code does not write; zarr reads it
            by_object: dict[str, list[int]] = {}
            for tile in written:
                by_object.setdefault(reader.layout.object_of(tile)[0], []).append(tile)
            for key, tiles in by_object.items():
                try:
                    problem = _verify_object(reader, key, tiles, whole if deep else None, name == "label", k, ignore)
                except DataError as err:
                    problem = str(err)
                if problem:
                    problems.append(problem)
                    if len(problems) >= limit:
                        return problems
    return problems


def _split_structure_problems(store: PatchStore, split: str, group: Any, names: list[str], num_tiles: int
                              ) -> list[str]:
    """What a split lacks before any chunk is read: every array with every tile of the tile table, every sample
    written."""
    problems = [f"{split}/{name} is missing or does not have {num_tiles} tiles"
                for name in [*store.modalities, "label", "valid"]
                if name not in names or group[name].shape[0] != num_tiles]
    if "done" not in group.array_keys():
        problems.append(f"{split}/done (which samples were written) is missing")
    elif not (done := np.asarray(group["done"][:])).all():
        problems.append(f"{split}: {int((~done).sum())} samples were never written")
    return problems


def _verify_object(reader: TileReader, key: str, tiles: list[int], whole: Any, is_label: bool, num_classes: int,
                   ignore_index: int) -> str | None:
    """One object's problem: a written tile without its chunk; with `whole` (deep) also checksums and labels."""
    if whole is None:  # quick: presence only, through the reader's own lookup (files, indexes, ranged reads)
        for tile in tiles:
            reader._encoded(tile)
        return None
    data = whole(key)
    if data is None:
        return f"store {reader.store_name}: {reader.layout.path} tile {tiles[0]} has no chunk ({key})"
    reader.check_object(key, data)
    raw = np.frombuffer(data, dtype=np.uint8)
    for tile in tiles:
        if reader.layout.sharded:
            n = reader.layout.index_nbytes
            index = reader._parse_index(raw[:n] if reader.layout.index_at_start else raw[-n:], key, tile)
            offset, length = (int(v) for v in index[tile % reader.layout.tiles_per_object])
            if offset == 2**64 - 1:
                return f"store {reader.store_name}: {reader.layout.path} tile {tile} has no shard index entry ({key})"
            chunk = raw[offset:offset + length]
        else:
            chunk = raw
        if is_label:
            value = _label_problem(reader.decode(tile, chunk, False), num_classes, ignore_index)
            if value is not None:
                split = reader.layout.path.split("/")[0]
                return str(label_value_error(reader.store_name, split, tile, value, num_classes, ignore_index))
    return None
