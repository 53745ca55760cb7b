"""DataModule: from a `dataset` config to a prepared store, loaders and the device preprocessor.

`instantiate(cfg.dataset)` gives a DataModule; `locate()` says which store the config means (layout, location,
fingerprint: the one place this is decided); `setup()` checks the root and the store's endpoint, prepares the
store when it is missing or stale (one process prepares, the others wait for its completion marker), checks a
local store's checksums once per machine, and checks patch and batch sizes against the data before any
training starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from segplat.data.augment_copy_paste import StoreDonor
from segplat.data.dataset import PatchDataset, collate
from segplat.data.layouts.base import LabelValue, Layout, ModalitySpec, build_layout
from segplat.data.preprocess import PhotometricAugment, Preprocessor
from segplat.data.store import (
    PatchStore,
    is_complete,
    prepare_store,
    store_fingerprint,
    verify_store,
    wait_until_complete,
)
from segplat.data.store_location import StoreLocation, check_access
from segplat.data.transforms import AugmentConfig, build_augment
from segplat.errors import ConfigError, DataError
from segplat.rules import check_patch_size
from segplat.schema import (
    Hint,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    build_section,
)
from segplat.utils.io import atomic_write_json
from segplat.utils.plain import to_plain

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

    @property
    def bands(self) -> dict[str, list[str]]:
        """Band names per modality, in channel order (what GFM encoders map onto their pretrained bands)."""
        return {m: [str(b) for b in s.bands] for m, s in self.specs.items()}


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


@contextmanager
def _local_lock(store: Path | None) -> Iterator[None]:
    """An exclusive lock beside a local store while it is prepared: the first process of every node prepares a
    local store, and on a shared file system those are several processes writing one folder."""
    if store is None:
        yield
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class DataModule:
    """`dataset`: its keys are this constructor's arguments, typed below (checked with the config, before any run)."""

    def __init__(
        self,
        name: str,
        layout: Mapping[str, Any],
        root: str | None = None,
        requires_root: bool = True,
        root_hint: str = "",
        store_dir: str = "~/.cache/segplat/stores",
        store_uri: str | None = None,
        store_client: Annotated[Literal["fsspec", "obstore"], Hint("obstore starts loader workers by forkserver")]
        = "fsspec",
        tiles_per_shard: Annotated[NonNegativeInt, Hint("0 = one object per tile; N = zarr v3 shards of N tiles")] = 0,
        cache_dir: str | None = None,
        cache_max_gb: Annotated[PositiveFloat, Hint("gigabytes of the remote store's local cache")] = 50.0,
        prepare_timeout_s: PositiveFloat = 3600.0,
        verify: Literal["once", "read", "off"] = "once",
        store_path: str | None = None,
        tile_size: PositiveInt = 256,
        compressor: Literal["none", "zstd", "lz4"] | None = "none",
        modalities: Sequence[str] | None = None,
        patch_size: PositiveInt = 256,
        batch_size: Annotated[PositiveInt, Hint("the global batch, split over the processes")] = 8,
        val_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 2,
        train_split: str = "train",
        val_split: str = "val",
        patches_per_tile: PositiveInt = 1,
        class_balanced: Annotated[Probability, Hint("the probability that a training crop is centred on a pixel of a "
                                                    "class drawn evenly from those in its tile: 0 = off, 1 = always")]
        = 0.0,
        augment: AugmentConfig | None = None,
        photometric: PhotometricAugment | None = None,
        seed: int = 0,
        ignore_index: LabelValue = 255,
        progress: bool = True,
    ) -> None:
        self.name = name
        self.layout_cfg = layout
        self.root = root
        self.requires_root = requires_root
        self.root_hint = root_hint
        self.store_dir = store_dir
        if store_path and store_uri and str(store_path) != str(store_uri):
            raise ConfigError(f"dataset.store_path={store_path} and dataset.store_uri={store_uri} disagree; "
                              "store_path is the old name of store_uri: set only dataset.store_uri.")
        self.store_uri = store_uri or store_path
        self.store_path: str | None = None  # the located store's path or URI, set by setup()
        self.store_client = store_client
        self.tiles_per_shard = int(tiles_per_shard or 0)
        self.cache_dir = cache_dir
        self.cache_max_gb = cache_max_gb
        self.prepare_timeout_s = float(prepare_timeout_s)
        self.verify = str(verify)
        self.location: StoreLocation | None = None
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
        self.augment_cfg = dict(to_plain(augment)) if augment else None
        self.photometric = build_section(PhotometricAugment, photometric) if photometric else None
        self.seed = int(seed)
        self.progress = progress
        self.ignore_index = int(ignore_index)
        self.store: PatchStore | None = None
        self.info: DataInfo | None = None
        if self.cache_dir and not (self.store_uri and str(self.store_uri).startswith("s3://")):
            raise ConfigError(f"dataset.cache_dir={self.cache_dir} caches remote stores only, but "
                              f"dataset.store_uri={self.store_uri} is local; unset dataset.cache_dir.")
        self._layout: Layout | None = None
        self._store_location()  # a malformed URI or client stops here, before anything is read

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
        """The layout, built once per data module (its file listing is then scanned once, too)."""
        if self._layout is not None:
            return self._layout
        cfg = self.layout_cfg
        if isinstance(cfg, Layout):
            self._layout = cfg
            return cfg
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        root = str(Path(self.root).expanduser()) if self.root else None
        self._layout = build_layout(cfg, root)  # unknown keys stop here, before any file is read
        return self._layout

    def describe(self) -> DataInfo:
        """What the data will give the model (modalities, band names, classes), from the layout alone: no store is
        prepared or opened, so a model that refuses these inputs stops before any data work (statistics empty)."""
        self.check_root()
        layout = self.build_layout()
        specs = self._selected(layout.modalities)
        return DataInfo(modalities={m: len(s.bands) for m, s in specs.items()}, specs=specs,
                        classes=list(layout.classes), palette=[list(c) for c in layout.palette],
                        ignore_index=layout.ignore_index)

    def _selected(self, specs: Mapping[str, ModalitySpec]) -> dict[str, ModalitySpec]:
        """`dataset.modalities` (default: all, in the data's order) picked out of `specs`, or one sentence."""
        names = self.modality_names or list(specs)
        unknown = [m for m in names if m not in specs]
        if unknown:
            raise ConfigError(f"dataset.modalities names {unknown}, which {self.name} does not have; "
                              f"choose from {list(specs)}.")
        return {m: specs[m] for m in names}

    def _store_location(self, fingerprint: str | None = None) -> StoreLocation | None:
        """The configured store_uri parsed (None when the store is named by its fingerprint under store_dir)."""
        if self.store_uri:
            uri = self.store_uri
        elif fingerprint is not None:
            uri = str(Path(self.store_dir).expanduser() / f"{self.name}-{fingerprint}.zarr")
        else:
            return None
        return StoreLocation.parse(uri, self.store_client, self.cache_dir, self.cache_max_gb)

    def locate(self) -> tuple[Layout, StoreLocation, str]:
        """Which store this config means: (layout, location, fingerprint); checks the root first."""
        self.check_root()
        layout = self.build_layout()
        fingerprint = store_fingerprint(layout, self.tile_size, self.compressor, self.tiles_per_shard)
        location = self._store_location(fingerprint)
        assert location is not None
        self.location = location
        return layout, location, fingerprint

    def prepare(self) -> Path | str:
        """Write the store if it is missing or stale; returns its path (a URI when remote)."""
        layout, location, _ = self.locate()
        check_access(location)
        return prepare_store(layout, location, self.tile_size, self.compressor, progress=self.progress,
                             tiles_per_shard=self.tiles_per_shard)

    def _ensure_store(self, accelerator: Any) -> tuple[StoreLocation, str]:
        """Prepare the store once: one process prepares (rank 0 for a remote store, each node's first process for
        a local one), the others wait for its completion marker, with a timeout that names the store."""
        layout, location, fingerprint = self.locate()
        check_access(location)  # a missing bucket, a wrong endpoint or refused credentials stop here
        if is_complete(location, fingerprint):
            return location, fingerprint
        world = accelerator.num_processes if accelerator is not None else 1
        preparer = world == 1 or (accelerator.is_main_process if location.remote
                                  else accelerator.is_local_main_process)
        if preparer:
            with _local_lock(None if location.remote else location.path):  # nodes may share the store's disk
                if not is_complete(location, fingerprint):
                    prepare_store(layout, location, self.tile_size, self.compressor, progress=self.progress,
                                  tiles_per_shard=self.tiles_per_shard)
                    if not location.remote:
                        self.record_verification(location, PatchStore(location).build, [])  # written just now
        else:
            log.info("waiting for another process to prepare %s", location.uri)
            wait_until_complete(location, fingerprint, self.prepare_timeout_s)
        return location, fingerprint

    def _verification_record(self, location: StoreLocation, build: str) -> Path:
        digest = hashlib.sha256(location.uri.encode()).hexdigest()[:16]
        return Path(self.store_dir).expanduser() / ".verified" / f"{digest}-{build}.json"

    def record_verification(self, location: StoreLocation, build: str, problems: list[str]) -> None:
        atomic_write_json(self._verification_record(location, build),
                          {"store": location.uri, "build": build, "problems": problems, "checked": time.time()})

    def _verify_once(self, accelerator: Any) -> None:
        """`verify=once`: a local store's every checksum and label value is read once per machine (cached by the
        store's build id), by each node's first process while the others wait; remote objects are checked as
        they are fetched instead."""
        assert self.store is not None and self.location is not None
        if self.verify != "once" or self.location.remote:
            return
        record = self._verification_record(self.location, self.store.build)
        if not record.is_file():
            if accelerator is None or accelerator.num_processes == 1 or accelerator.is_local_main_process:
                log.info("checking every chunk of %s once on this machine (dataset.verify=once)", self.location.uri)
                self.record_verification(self.location, self.store.build, verify_store(self.store, deep=True))
            else:
                deadline = time.monotonic() + self.prepare_timeout_s
                while not record.is_file():
                    if time.monotonic() > deadline:
                        raise DataError(f"waited {self.prepare_timeout_s:g} s for another process to check the store "
                                        f"{self.location.uri}; raise dataset.prepare_timeout_s or run "
                                        "`python -m segplat.prepare ... verify=deep` first.")
                    time.sleep(1.0)
        problems = json.loads(record.read_text()).get("problems", [])
        if problems:
            raise DataError(f"store {self.location.uri} is damaged: {problems[0]}"
                            + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
                            + "; delete it or run `python -m segplat.prepare ... force=true`.")

    def setup(self, accelerator=None) -> DataInfo:
        """Prepare (one process; the others wait), open the store, check it, and check sizes against the data."""
        if accelerator is not None:  # a global batch that does not split over the processes stops before any read
            self.per_process_batch(accelerator.num_processes)
            self.per_process_batch(accelerator.num_processes, self.val_batch_size, "dataset.val_batch_size")
        location, _ = self._ensure_store(accelerator)
        self.store_path = location.uri if location.remote else str(location.path)
        self.store = PatchStore(location)
        self._verify_once(accelerator)
        specs = self._selected(self.store.modalities)
        names = list(specs)
        check_patch_size(self.patch_size, self.store.tile_size, {m: specs[m].scale for m in names}, self.name)
        if self.store.ignore_index != self.ignore_index:
            raise ConfigError(f"dataset.ignore_index={self.ignore_index} differs from the store's "
                              f"{self.store.ignore_index} ({location.uri}); set it to {self.store.ignore_index}.")
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
            donor = StoreDonor(self.location, split, list(self.info.modalities), self.patch_size) \
                if self.augment_cfg.get("copy_paste") else None
            augment = build_augment(self.augment_cfg, self.info.specs, self.info.ignore_index, donor)
        return PatchDataset(self.location, split, self.patch_size, list(self.info.modalities), train=train,
                            patches_per_tile=self.patches_per_tile, class_balanced=self.class_balanced,
                            augment=augment, seed=self.seed, verify=self.verify == "read")

    def loader(self, split: str, train: bool, rank: int = 0, world: int = 1) -> DataLoader:
        ds = self.dataset(split, train)
        per_proc = self.per_process_batch(world, self.batch_size if train else self.val_batch_size,
                                          "dataset.batch_size" if train else "dataset.val_batch_size")
        sampler = ShardSampler(len(ds), rank, world, shuffle=train, seed=self.seed, pad=train)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(persistent_workers=False, prefetch_factor=2)
            if self.location is not None and self.location.remote and self.location.client == "obstore":
                kwargs["multiprocessing_context"] = "forkserver"  # obstore's runtime does not survive a fork
        return DataLoader(ds, batch_size=per_proc, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate, drop_last=train and len(sampler) >= per_proc,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def train_loader(self, rank: int = 0, world: int = 1) -> DataLoader:
        return self.loader(self.train_split, True, rank, world)

    def val_loader(self, rank: int = 0, world: int = 1) -> DataLoader:
        return self.loader(self.val_split, False, rank, world)

    def preprocessor(self) -> Preprocessor:
        assert self.info is not None, "call setup() first"
        return Preprocessor(self.info.specs, self.info.stats, list(self.info.modalities), self.photometric, self.seed)
