"""DataModule: from a `dataset` config to a prepared store, loaders and the device preprocessor.

`instantiate(cfg.dataset)` gives a DataModule; `setup()` checks the root, prepares the store
when it is missing or stale (main process first, the others wait), and checks patch and batch
sizes against the data before any training starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from segplat.data.augment_copy_paste import StoreDonor
from segplat.data.dataset import PatchDataset, collate
from segplat.data.layouts.base import Layout, ModalitySpec, build_layout
from segplat.data.preprocess import PhotometricAugment, Preprocessor
from segplat.data.store import PatchStore, is_complete, prepare_store
from segplat.data.transforms import build_augment
from segplat.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DataInfo:
    """What the model, loss, metrics and prediction need to know about the data."""

    modalities: dict[str, int]  # name -> channels, in model input order
    specs: dict[str, ModalitySpec]
    classes: list[str]
    palette: list[list[int]]
    ignore_index: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ShardSampler(Sampler[int]):
    """Each rank's share of the indices. Training: a fresh permutation per epoch (seed + epoch), padded
    with repeats so every rank takes the same number of steps. Evaluation: a strided split with no
    padding, so no sample is ever counted twice in the summed confusion matrix."""

    def __init__(self, length: int, rank: int, world: int, shuffle: bool, seed: int, pad: bool) -> None:
        self.length, self.rank, self.world = length, rank, world
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.pad and self.world > 1:
            total = math.ceil(self.length / self.world) * self.world
            order += order[: total - len(order)]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class DataModule:
    def __init__(
        self,
        name: str,
        layout: Mapping[str, Any],
        root: str | None = None,
        requires_root: bool = True,
        root_hint: str = "",
        store_dir: str = "~/.cache/segplat/stores",
        store_path: str | None = None,
        tile_size: int = 256,
        compressor: str | None = "none",
        modalities: Sequence[str] | None = None,
        patch_size: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        train_split: str = "train",
        val_split: str = "val",
        patches_per_tile: int = 1,
        class_balanced: float = 0.0,
        augment: Mapping[str, Any] | None = None,
        photometric: Mapping[str, Any] | None = None,
        seed: int = 0,
        ignore_index: int = 255,
        progress: bool = True,
    ) -> None:
        self.name = name
        self.layout_cfg = layout
        self.root = root
        self.requires_root = requires_root
        self.root_hint = root_hint
        self.store_dir = store_dir
        self.store_path = store_path
        self.tile_size = int(tile_size)
        self.compressor = compressor
        self.modality_names = list(modalities) if modalities else None
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_split, self.val_split = train_split, val_split
        self.patches_per_tile = int(patches_per_tile)
        self.class_balanced = float(class_balanced)
        self.augment_cfg = dict(augment) if augment else None
        self.photometric_cfg = dict(photometric) if photometric else None
        self.seed = int(seed)
        self.progress = progress
        self.ignore_index = int(ignore_index)
        self.store: PatchStore | None = None
        self.info: DataInfo | None = None
        for key, value in (("dataset.patch_size", self.patch_size), ("dataset.batch_size", self.batch_size),
                           ("dataset.tile_size", self.tile_size), ("dataset.patches_per_tile", self.patches_per_tile)):
            if value <= 0:
                raise ConfigError(f"{key}={value} must be a positive integer.")
        if self.num_workers < 0:
            raise ConfigError(f"dataset.num_workers={self.num_workers} must be 0 or more.")

    # -- set-up ---------------------------------------------------------------------------------
    def check_root(self) -> None:
        """Fail at once, before anything is read, when the dataset needs a root that is not there."""
        if not self.requires_root:
            return
        if not self.root:
            raise ConfigError(
                f"dataset.root is not set: the {self.name} data must be in a folder laid out as {self.root_hint}; "
                f"pass dataset.root=/path/to/{self.name}, or write a small fake copy with "
                f"`python -m segplat.data.fake {self.name} /tmp/{self.name}` and pass dataset.root=/tmp/{self.name}."
            )
        if not Path(self.root).expanduser().is_dir():
            raise ConfigError(f"dataset.root={self.root} is not a folder; point it at the {self.name} data "
                              f"({self.root_hint}).")

    def build_layout(self) -> Layout:
        cfg = self.layout_cfg
        if isinstance(cfg, Layout):
            return cfg
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        root = str(Path(self.root).expanduser()) if self.root else None
        return build_layout(cfg, root)  # unknown keys stop here, before any file is read

    def resolve_store_path(self, layout: Layout) -> Path:
        if self.store_path:
            return Path(self.store_path).expanduser()
        fp = layout.fingerprint({"tile_size": self.tile_size, "format": 1})
        return Path(self.store_dir).expanduser() / f"{self.name}-{fp}.zarr"

    def prepare(self) -> Path:
        """Write the store if it is missing or stale; returns its path."""
        self.check_root()
        layout = self.build_layout()
        path = self.resolve_store_path(layout)
        return prepare_store(layout, path, self.tile_size, self.compressor, progress=self.progress)

    def setup(self, accelerator=None) -> DataInfo:
        """Prepare (main process first), open the store and check sizes against the data."""
        if accelerator is not None:  # a global batch that does not split over the processes stops before any read
            self.per_process_batch(accelerator.num_processes)
            self.per_process_batch(accelerator.num_processes, self.val_batch_size, "dataset.val_batch_size")
        self.check_root()
        layout = self.build_layout()
        path = self.resolve_store_path(layout)
        fp = layout.fingerprint({"tile_size": self.tile_size, "format": 1})
        if accelerator is not None and accelerator.num_processes > 1:
            with accelerator.main_process_first():
                if not is_complete(path, fp):
                    prepare_store(layout, path, self.tile_size, self.compressor,
                                  progress=self.progress and accelerator.is_main_process)
        elif not is_complete(path, fp):
            prepare_store(layout, path, self.tile_size, self.compressor, progress=self.progress)
        self.store_path = str(path)
        self.store = PatchStore(path)
        specs = self.store.modalities
        names = self.modality_names or list(specs)
        unknown = [m for m in names if m not in specs]
        if unknown:
            raise ConfigError(f"dataset.modalities names {unknown}, which {self.name} does not have; "
                              f"choose from {list(specs)}.")
        if self.patch_size > self.store.tile_size:
            raise ConfigError(f"dataset.patch_size={self.patch_size} is larger than the {self.name} tiles "
                              f"({self.store.tile_size} px); lower dataset.patch_size or raise dataset.tile_size.")
        if self.store.ignore_index != self.ignore_index:
            raise ConfigError(f"dataset.ignore_index={self.ignore_index} differs from the store's "
                              f"{self.store.ignore_index} ({path}); set it to {self.store.ignore_index}.")
        self.info = DataInfo(
            modalities={m: len(specs[m].bands) for m in names},
            specs={m: specs[m] for m in names},
            classes=self.store.classes,
            palette=self.store.palette,
            ignore_index=self.store.ignore_index,
            stats={m: self.store.stats[m] for m in names},
        )
        return self.info

    # -- loaders --------------------------------------------------------------------------------
    def per_process_batch(self, world: int, batch_size: int | None = None, key: str = "dataset.batch_size") -> int:
        batch = batch_size or self.batch_size
        if batch % world:
            raise ConfigError(f"{key}={batch} is the global batch and must divide evenly over "
                              f"{world} processes; use a multiple of {world}.")
        return batch // world

    def dataset(self, split: str, train: bool) -> PatchDataset:
        assert self.info is not None, "call setup() first"
        augment = None
        if train and self.augment_cfg:
            cfg = {k: (OmegaConf.to_container(v) if isinstance(v, DictConfig | ListConfig) else v)
                   for k, v in self.augment_cfg.items()}
            donor = StoreDonor(self.store_path, split, list(self.info.modalities), self.patch_size) \
                if cfg.get("copy_paste") else None
            augment = build_augment(cfg, self.info.specs, self.info.ignore_index, donor)
        return PatchDataset(self.store_path, split, self.patch_size, list(self.info.modalities), train=train,
                            patches_per_tile=self.patches_per_tile, class_balanced=self.class_balanced,
                            augment=augment, seed=self.seed)

    def loader(self, split: str, train: bool, rank: int = 0, world: int = 1) -> DataLoader:
        ds = self.dataset(split, train)
        per_proc = self.per_process_batch(world, self.batch_size if train else self.val_batch_size,
                                          "dataset.batch_size" if train else "dataset.val_batch_size")
        sampler = ShardSampler(len(ds), rank, world, shuffle=train, seed=self.seed, pad=train)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(persistent_workers=False, prefetch_factor=2)
        return DataLoader(ds, batch_size=per_proc, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate, drop_last=train and len(sampler) >= per_proc,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def train_loader(self, rank: int = 0, world: int = 1) -> DataLoader:
        return self.loader(self.train_split, True, rank, world)

    def val_loader(self, rank: int = 0, world: int = 1) -> DataLoader:
        return self.loader(self.val_split, False, rank, world)

    def preprocessor(self) -> Preprocessor:
        assert self.info is not None, "call setup() first"
        photometric = PhotometricAugment(**self.photometric_cfg) if self.photometric_cfg else None
        return Preprocessor(self.info.specs, self.info.stats, list(self.info.modalities), photometric, self.seed)
