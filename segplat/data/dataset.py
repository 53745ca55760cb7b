"""PatchDataset: patches of `patch_size` cut from a store's tiles, in native dtypes.

Training draws random crops (optionally class-balanced), validation walks a grid over each
tile. Randomness comes from a generator seeded by (seed, epoch, index): a sample's crop and
augmentation do not depend on which rank or worker loads it, which makes runs reproducible
across worker counts and exactly resumable, and gives every rank and worker distinct streams.
The zarr store is opened lazily in each worker process (safe under fork, spawn, forkserver); tiles are read
from their chunk bytes (chunk_reader.py): crops of an uncompressed store are sliced from memory maps of its
chunk files or shards (local, or fetched into the read-through cache of a remote store), not decoded by zarr.
A label value outside the classes and the ignore index stops with the store and tile named.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segplat.data.store import PatchStore, label_value_error
from segplat.data.store_location import StoreLocation
from segplat.data.windows import grid_alignment, window_starts
from segplat.errors import ConfigError
from segplat.rules import check_patch_size


class _ArrayHandles(dict):
    """name -> array reader, opened on first use and kept: opening parses the array's metadata, which costs
    more than reading a small crop, so it must not happen per sample. With `memmap`, arrays whose tiles this
    code can read from their chunk bytes get a TileReader (memory maps of local files or cached objects), small
    other ones (dates) are read whole into memory (chunk_reader.py); anything else stays a zarr array. All are
    indexed the same way."""

    def __init__(self, store: PatchStore, split: str, memmap: bool = True, verify: bool = False) -> None:
        super().__init__()
        self.store, self.split = store, split
        self.group = store.split(split)
        self.memmap, self.verify = memmap, verify

    def __missing__(self, key: str):
        reader = self.store.reader(self.split, key, self.verify) if self.memmap else self.group[key]
        self[key] = reader
        return reader


class PatchDataset(Dataset):
    def __init__(
        self,
        store_path: str | Path | StoreLocation,
        split: str,
        patch_size: int,
        modalities: Sequence[str] | None = None,
        train: bool = False,
        patches_per_tile: int = 1,
        class_balanced: float = 0.0,
        augment: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]] | None = None,
        seed: int = 0,
        chunk_memmap: bool = True,
        verify: bool = False,
    ) -> None:
        self.location = StoreLocation.parse(store_path)
        self.store_path = self.location.uri
        self.chunk_memmap = bool(chunk_memmap)  # False forces zarr's own read path (benchmarks, debugging)
        self.verify = bool(verify)  # checksums of memory-mapped chunks on first read per worker (dataset.verify=read)
        self.split = split
        self.patch_size = int(patch_size)
        self.train = train
        self.patches_per_tile = int(patches_per_tile)
        self.class_balanced = float(class_balanced)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        store = PatchStore(self.location)
        self.specs = store.modalities
        self.modalities = list(modalities) if modalities else list(self.specs)
        unknown = [m for m in self.modalities if m not in self.specs]
        if unknown:
            raise ConfigError(f"dataset.modalities names {unknown}, which the store {store.path} does not hold; "
                              f"choose from {list(self.specs)}.")
        self.tile_size = store.tile_size
        scales = {m: self.specs[m].scale for m in self.modalities}
        check_patch_size(self.patch_size, self.tile_size, scales, f"store {store.location.uri}")
        # crop offsets snap to whole pixels of every coarser modality (8 for a 1/8 grid); otherwise a
        # 64x64 grid cut at round(y / 8) would sit up to 4 label pixels off the label crop
        self.align = grid_alignment(scales.values())
        self.ignore_index = store.ignore_index
        self.num_classes = len(store.classes)
        self._index(store.tiles_meta(split))
        self._store: PatchStore | None = store  # reused by this process's first _open (opening costs requests remotely)
        self._group = None
        self._pid: int | None = os.getpid()

    def _index(self, meta: list[dict[str, Any] | None]) -> None:
        """The samples: a tile per training draw (`patches_per_tile` each), or the validation windows of each tile."""
        self.tiles = [i for i, m in enumerate(meta) if m is not None]  # skipped samples leave empty tiles
        # the scene's part of each tile (rows, columns from the top left); the rest is padding, never cropped alone
        full = [0, 0, self.tile_size, self.tile_size]
        self.valid_size = {t: tuple(int(v) for v in meta[t].get("window", full)[2:4]) for t in self.tiles}
        # validation: windows over the scene's part only, each label pixel scored once (`owned` rows and columns)
        self.owned: list[tuple[int, int]] = []
        if self.train:
            self.index = [(t, None) for t in self.tiles for _ in range(self.patches_per_tile)]
            return
        self.index = []
        for t in self.tiles:
            ys, xs = (self._grid(n) for n in self.valid_size[t])
            self.index += [(t, (y, x)) for y, _ in ys for x, _ in xs]
            self.owned += [(oy, ox) for _, oy in ys for _, ox in xs]

    def _grid(self, length: int) -> list[tuple[int, int]]:
        """(start, first owned pixel within the window) of validation windows covering `length` scene pixels: the
        last start snaps up to the coarsest grid's pixels (it stays inside the tile, whose size is a multiple), and
        the rows it shares with the window before it are scored there, not twice."""
        p, a = self.patch_size, self.align
        starts = sorted({min(-(-y // a) * a, self.tile_size - p) for y in window_starts(length, p, p)})
        return [(y, 0 if k == 0 else max(0, starts[k - 1] + p - y)) for k, y in enumerate(starts)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"] = None
        state["_pid"] = None
        state["_store"] = None
        return state

    def _open(self) -> _ArrayHandles:
        """Array handles of this split, opened once per process (re-opened after a fork or spawn)."""
        if self._group is None or self._pid != os.getpid():
            store = self._store if self._store is not None and self._pid == os.getpid() else PatchStore(self.location)
            self._group = _ArrayHandles(store, self.split, self.chunk_memmap, self.verify)
            self._store, self._pid = None, os.getpid()
        return self._group

    def _choose_offset(self, group, tile: int, rng: np.random.Generator) -> tuple[int, int]:
        """A random crop inside the scene's part of the tile: a border tile's padding is never most of a crop (a
        scene smaller than the patch is cropped whole, with its padding)."""
        height, width = self.valid_size[tile]
        span_y, span_x = max(0, height - self.patch_size), max(0, width - self.patch_size)
        if self.class_balanced > 0 and rng.random() < self.class_balanced:
            label = np.asarray(group["label"][tile])
            present = [c for c in np.unique(label) if c != self.ignore_index]
            if present:
                cls = rng.choice(present)
                ys, xs = np.nonzero(label == cls)
                k = rng.integers(len(ys))
                half = self.patch_size // 2
                return (int(np.clip(ys[k] - half, 0, span_y)), int(np.clip(xs[k] - half, 0, span_x)))
        return int(rng.integers(0, span_y + 1)), int(rng.integers(0, span_x + 1))

    def __getitem__(self, i: int) -> dict[str, Any]:
        group = self._open()
        tile, offset = self.index[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        y, x = offset if offset is not None else self._choose_offset(group, tile, rng)
        y, x = y - y % self.align, x - x % self.align  # keep coarser grids aligned with the label
        p = self.patch_size
        sample: dict[str, Any] = {}
        for m in self.modalities:
            s = self.specs[m].scale
            ys, xs, ps = round(y * s), round(x * s), round(p * s)
            sample[m] = np.asarray(group[m][tile, ..., ys:ys + ps, xs:xs + ps])
            if self.specs[m].temporal:
                dates = np.asarray(group[f"{m}_dates"][tile])
                sample[f"{m}_dates"] = dates
                sample[f"{m}_time_mask"] = dates >= 0
        label = np.asarray(group["label"][tile, y:y + p, x:x + p])
        if self.owned and any(own := self.owned[i]):  # scored by the window before this one
            label = label.copy()
            label[:own[0]] = self.ignore_index
            label[:, :own[1]] = self.ignore_index
        if label.size and int(label.max()) >= self.num_classes:  # cheap common case: every value is a class
            bad = label[(label >= self.num_classes) & (label != self.ignore_index)]
            if bad.size:
                raise label_value_error(self.store_path, self.split, tile, int(bad.flat[0]), self.num_classes,
                                        self.ignore_index)
        sample["label"] = label
        if self.train and self.augment is not None:
            sample = self.augment(sample, rng)
        # labels stay uint8 through the loader (8x less to copy, pin and transfer); cast on the device
        sample["label"] = np.ascontiguousarray(sample["label"], dtype=np.uint8)
        sample["tile"] = np.int64(tile)
        sample["offset"] = np.array([y, x], dtype=np.int64)
        return sample


def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack numpy samples into tensors without changing their dtypes."""
    out = {}
    for key in batch[0]:
        out[key] = torch.from_numpy(np.stack([np.asarray(b[key]) for b in batch]))
    return out
