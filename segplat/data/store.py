"""The zarr v3 patch store: every dataset is prepared once into this format, then read by PatchDataset.

Layout of a store (DESIGN.md):

    NAME-FINGERPRINT.zarr/            root attrs["segplat"]: format version, dataset, fingerprint,
                                      tile size, classes, palette, ignore index, modalities
                                      (bands, nodata, dtype, scale, ...), per-band stats (train split,
                                      valid pixels only: mean, std, p2, p98, count)
      train/ val/ test/ ...           one group per split, attrs["tiles"]: source file, CRS,
                                      transform and window of every tile
        <modality>  (N, C, h, w)      native dtype, one tile per chunk (temporal: (N, T, C, h, w))
        <modality>_dates (N, T)       day offsets, temporal streams only; -1 marks padding
        label       (N, H, W) uint8   class index or the ignore index
        valid       (N, H, W) bool    False on padding and where every modality is no-data
        done        (N,) bool         resume bookkeeping: which tiles are written
      _SEGPLAT_COMPLETE.json          written last; the folder is built as NAME.zarr.partial and
                                      renamed, so an incomplete store is never read as complete
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, check_label_values
from segplat.errors import DataError
from segplat.utils.io import atomic_write_json

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
COMPLETE_MARKER = "_SEGPLAT_COMPLETE.json"
MAX_STAT_SAMPLES = 2_000_000  # per band; above this percentiles come from a seeded subsample


def compressor_codecs(name: str | None) -> list[Any] | None:
    """Map a config name to zarr v3 codecs; None means raw chunks."""
    if name in (None, "none"):
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    if name == "lz4":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle=zarr.codecs.BloscShuffle.shuffle)]
    raise DataError(f"dataset.compressor={name!r} is not known; use one of none, zstd, lz4.")


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


class StoreWriter:
    """Writes a layout into a store; resumable (done flags) and verified against the layout's shapes."""

    def __init__(
        self,
        layout: Layout,
        path: str | Path,
        tile_size: int,
        compressor: str | None = "none",
        fingerprint_extra: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.layout = layout
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.tile_size = int(tile_size)
        self.compressor = compressor
        self.fingerprint = layout.fingerprint({"tile_size": self.tile_size, "format": STORE_FORMAT_VERSION,
                                               **(fingerprint_extra or {})})
        self.progress = progress
        self.skipped: list[str] = []

    # -- public ---------------------------------------------------------------------------------
    def run(self) -> Path:
        if is_complete(self.path, self.fingerprint):
            log.info("store %s is complete (fingerprint %s)", self.path, self.fingerprint)
            return self.path
        started = time.time()
        splits = self.layout.scan()
        if not any(splits.values()):
            raise DataError(f"no samples found under {self.layout.root} for dataset {self.layout.name}; "
                            "check dataset.root.")
        root = self._open_partial()
        for split, refs in splits.items():
            if refs:
                self._write_split(root, split, refs)
        written = [s for s in splits if s in root and any(m is not None for m in root[s].attrs["tiles"])]
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
        atomic_write_json(self.partial / COMPLETE_MARKER, {
            "fingerprint": self.fingerprint, "format": STORE_FORMAT_VERSION,
            "seconds": round(time.time() - started, 1), "skipped": len(self.skipped),
        })
        if self.path.exists():
            stale = self.path.with_name(self.path.name + f".stale-{int(time.time())}")
            self.path.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        self.partial.rename(self.path)
        group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        counts = {s: len({m["source"] for m in group[s].attrs["tiles"] if m is not None}) for s in written}
        log.info("prepared %s: samples written per split %s, skipped %d", self.path, counts, len(self.skipped))
        return self.path

    # -- internals ------------------------------------------------------------------------------
    def _open_partial(self) -> zarr.Group:
        if self.partial.exists():
            try:
                root = zarr.open_group(str(self.partial), mode="r+", zarr_format=3)
                if root.attrs.get("segplat", {}).get("fingerprint") == self.fingerprint:
                    log.info("resuming the unfinished store %s", self.partial)
                    return root
            except Exception:  # an unreadable partial store is rebuilt, never trusted
                pass
            shutil.rmtree(self.partial)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
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
        }
        return root

    def _plan(self, refs: list[SampleRef], shapes: list[tuple[int, int]]) -> list[TilePlan]:
        plans, start = [], 0
        for ref, (h, w) in zip(refs, shapes):
            windows = tile_windows(h, w, self.tile_size) if h > 0 and w > 0 else []  # [] = skipped at scan
            plans.append(TilePlan(ref, start, windows))
            start += len(windows)
        return plans

    def _write_split(self, root: zarr.Group, split: str, refs: list[SampleRef]) -> None:
        mods = self.layout.modalities
        shapes_path = f"{split}_shapes"
        shapes = root.attrs.get(shapes_path)
        if shapes is None:
            shapes = []
            for ref in tqdm(refs, desc=f"scan {split}", disable=not self.progress, leave=False):
                try:
                    shapes.append(list(self._sample_shape(ref)))
                except DataError as err:  # an unreadable file skips its sample, not the whole prepare
                    self.skipped.append(str(err))
                    log.warning("skipped: %s", err)
                    shapes.append([0, 0])
            root.attrs[shapes_path] = shapes
        plans = self._plan(refs, [tuple(s) for s in shapes])
        n_tiles = plans[-1].start + len(plans[-1].windows)
        if n_tiles == 0:
            return
        t = self.tile_size
        codecs = compressor_codecs(self.compressor)
        if split not in root:
            group = root.create_group(split)
            for name, spec in mods.items():
                mt = round(t * spec.scale)
                if spec.temporal:
                    shape = (n_tiles, spec.max_time, len(spec.bands), mt, mt)
                    group.create_array(f"{name}_dates", shape=(n_tiles, spec.max_time), chunks=(1, spec.max_time),
                                       dtype="int32", fill_value=-1, compressors=codecs)
                else:
                    shape = (n_tiles, len(spec.bands), mt, mt)
                group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=spec.dtype,
                                   fill_value=_fill_value(spec), compressors=codecs)
            group.create_array("label", shape=(n_tiles, t, t), chunks=(1, t, t), dtype="uint8",
                               fill_value=self.layout.ignore_index, compressors=codecs)
            group.create_array("valid", shape=(n_tiles, t, t), chunks=(1, t, t), dtype="bool",
                               fill_value=False, compressors=codecs)
            group.create_array("done", shape=(len(refs),), chunks=(len(refs),), dtype="bool", fill_value=False)
            group.attrs["tiles"] = [None] * n_tiles
        group = root[split]
        done = group["done"][:]
        tiles_meta = list(group.attrs["tiles"])
        # a sample counts as written only when its tiles are in the tile table: the table and the done flags are
        # flushed together (table first), and anything a crash left unrecorded is written again; skipped
        # samples are re-checked too, which rebuilds the skipped list of a resumed run
        todo = [i for i in range(len(plans)) if not done[i] or any(
            tiles_meta[plans[i].start + k] is None for k in range(len(plans[i].windows)))]

        def flush() -> None:
            group.attrs["tiles"] = tiles_meta
            group["done"][:] = done

        for n, i in enumerate(tqdm(todo, desc=f"prepare {split}", disable=not self.progress, unit="sample")):
            plan = plans[i]
            if n and n % 16 == 0:
                flush()
            if not plan.windows:
                done[i] = True
                continue
            try:
                sample = self.layout.read(plan.ref)
                self._validate(sample, tuple(shapes[i]), plan.ref)
            except DataError as err:
                self.skipped.append(str(err))
                log.warning("skipped: %s", err)
                done[i] = True
                continue
            for k, window in enumerate(plan.windows):
                idx = plan.start + k
                tiles_meta[idx] = self._write_tile(group, idx, sample, window)
            done[i] = True
        flush()

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
                raise DataError(f"{sample.source}: {name} is {arr.shape[-2]}x{arr.shape[-1]} pixels but the "
                                f"label grid needs {want[0]}x{want[1]}; the modalities' sizes disagree.")
            if arr.shape[-3] != len(spec.bands):
                raise DataError(f"{sample.source}: {name} has {arr.shape[-3]} bands, expected {len(spec.bands)} "
                                f"({', '.join(spec.bands)}).")
        check_label_values(sample.label, len(self.layout.classes), self.layout.ignore_index, sample.source)
        for name, spec in mods.items():  # a modality with no data would train the model on a dead input
            if _nodata_mask(sample.arrays[name], spec.nodata).all():
                path = (ref.files.get(name) if ref is not None else None) or sample.source
                raise DataError(f"{path}: every pixel of {name} is no-data in this sample, so the sample was skipped "
                                "(replace the file or remove the sample).")

    def _write_tile(self, group: zarr.Group, idx: int, sample: Sample,
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
        valid_all = group["valid"]
        n = valid_all.shape[0]
        for name, spec in self.layout.modalities.items():
            arr = group[name]
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


def read_marker(path: str | Path) -> dict[str, Any] | None:
    marker = Path(path) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(path: str | Path, fingerprint: str | None = None) -> bool:
    marker = read_marker(path)
    if marker is None:
        return False
    return fingerprint is None or marker.get("fingerprint") == fingerprint


class PatchStore:
    """Read side of a store: metadata plus lazy access to the split groups."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not is_complete(self.path):
            raise DataError(f"{self.path} is not a complete segplat store (no {COMPLETE_MARKER}); "
                            "run `python -m segplat.prepare` for it again.")
        self.root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        self.meta: dict[str, Any] = dict(self.root.attrs["segplat"])

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
        with warnings.catch_warnings():  # zarr warns about the marker file, which is ours
            warnings.simplefilter("ignore")
            return [name for name, _ in self.root.groups()]

    def split(self, name: str) -> zarr.Group:
        if name not in self.splits:
            raise DataError(f"{self.path} has no split {name!r}; it has {', '.join(self.splits)}.")
        return self.root[name]

    def num_tiles(self, split: str) -> int:
        return int(self.split(split)["label"].shape[0])

    def tiles_meta(self, split: str) -> list[dict[str, Any]]:
        return list(self.split(split).attrs["tiles"])


def prepare_store(layout: Layout, path: str | Path, tile_size: int, compressor: str | None = "none",
                  progress: bool = True, fingerprint_extra: Mapping[str, Any] | None = None) -> Path:
    """Write (or resume, or verify) the store for `layout` at `path`; returns the path."""
    return StoreWriter(layout, path, tile_size, compressor, fingerprint_extra, progress).run()


def iter_split_tiles(store: PatchStore, split: str) -> Iterable[int]:
    return range(store.num_tiles(split))
