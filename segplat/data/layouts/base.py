"""What every dataset reader provides: its constants, its samples per split, one sample's arrays.

A layout knows one raw on-disk format (see ../shared/DATASETS.md) and nothing about zarr,
patches or training. `segplat.data.store.prepare_store` turns any layout into a patch store.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModalitySpec:
    """One input stream as stored: band names, no-data value, dtype, and how it relates to the label grid.

    `scale` is this modality's pixels per label pixel (1.0 for co-registered images, 0.125 for a
    64x64 air-quality grid under a 512x512 label). `temporal` streams are stored (T, C, H, W).
    `optical` streams get photometric augmentation; radar/elevation/grids do not.
    """

    bands: tuple[str, ...]
    nodata: float | None = None
    dtype: str = "uint8"
    optical: bool = True
    scale: float = 1.0
    temporal: bool = False
    max_time: int | None = None

    def to_attrs(self) -> dict[str, Any]:
        d = asdict(self)
        d["bands"] = list(self.bands)
        return d

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ModalitySpec:
        d = dict(attrs)
        d["bands"] = tuple(d["bands"])
        return cls(**d)


@dataclass
class Sample:
    """One scene as read from disk. Arrays are (C, H, W) or (T, C, H, W) in their native dtype;
    `label` is (H, W) uint8 class indices with the ignore index already applied."""

    arrays: dict[str, np.ndarray]
    label: np.ndarray
    source: str
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    dates: dict[str, np.ndarray] = field(default_factory=dict)  # temporal streams: day offsets, (T,)


@dataclass(frozen=True)
class SampleRef:
    """A cheap handle to one sample: an id plus the files it reads (used in messages and attrs)."""

    id: str
    files: Mapping[str, str] = field(default_factory=dict)


class Layout(ABC):
    """Base class of dataset readers. Subclasses carry the dataset's constants as class attributes."""

    name: str = "layout"
    classes: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    ignore_index: int = 255
    splits: tuple[str, ...] = ("train", "val")

    def __init__(self, root: str | None = None) -> None:
        self.root = root

    @property
    @abstractmethod
    def modalities(self) -> dict[str, ModalitySpec]:
        """The streams this layout yields, in model input order (the first is the primary one)."""

    @abstractmethod
    def scan(self) -> dict[str, list[SampleRef]]:
        """Check the tree under `root` and list the samples of each split; raise DataError naming what is missing."""

    @abstractmethod
    def read(self, ref: SampleRef) -> Sample:
        """Read one sample; raise DataError naming the file on anything wrong."""

    def fingerprint_params(self) -> dict[str, Any]:
        """Everything that changes the prepared store; subclasses add their options."""
        return {"name": self.name, "root": str(self.root), "classes": list(self.classes)}

    def fingerprint(self, extra: Mapping[str, Any] | None = None) -> str:
        params = {**self.fingerprint_params(), **(extra or {})}
        blob = json.dumps(params, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int, source: str) -> None:
    """Refuse labels with values that are neither a class nor the ignore index."""
    from segplat.errors import DataError

    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        values = sorted({int(v) for v in np.unique(label[bad])})[:8]
        raise DataError(
            f"{source}: label values {values} are outside the {num_classes} classes and the ignore index "
            f"{ignore_index}; fix the label file or the dataset's class table."
        )


def check_band_count(array: np.ndarray, expected: Sequence[str], source: str, modality: str) -> None:
    from segplat.errors import DataError

    channels = array.shape[-3]
    if channels != len(expected):
        raise DataError(
            f"{source}: {modality} has {channels} bands but the layout expects {len(expected)} "
            f"({', '.join(expected)}); check the file or the dataset's band list."
        )


def _stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) from a file stem and a seed: the same split on every machine and Python run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(ids: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """id -> "train" / "val", deterministic per id (adding files never moves the others, except that a
    tiny dataset whose draw left val empty gives val its lowest-drawn id, so validation always has data)."""
    draws = {i: _stable_fraction(i, seed) for i in ids}
    out = {i: ("val" if d < val_fraction else "train") for i, d in draws.items()}
    if val_fraction > 0 and len(ids) >= 2 and "val" not in out.values():
        out[min(draws, key=draws.__getitem__)] = "val"
    return out
