"""What every dataset reader provides: its constants, its samples per split, one sample's arrays.

A layout knows one raw on-disk format (see docs/datasets.md) and nothing about zarr,
patches or training. `segplat.data.store.prepare_store` turns any layout into a patch store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
from annotated_types import Ge, Le

from segplat.errors import ConfigError
from segplat.messages import not_a_key
from segplat.schema import Hint
from segplat.utils.plain import to_plain

# a class index or ignore index: labels are stored as uint8
LabelValue = Annotated[int, Ge(0), Le(255), Hint("labels are stored as 8-bit values")]
Channel = Annotated[int, Ge(0), Le(255)]
RGB = tuple[Channel, Channel, Channel]  # a class colour


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
        """Strict JSON: a NaN nodata is written as the string "nan" (bare NaN is not JSON; null means none)."""
        d = asdict(self)
        d["bands"] = list(self.bands)
        if isinstance(self.nodata, float) and math.isnan(self.nodata):
            d["nodata"] = "nan"
        return d

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ModalitySpec:
        """Reads what to_attrs writes, and the bare NaN older stores hold."""
        d = dict(attrs)
        d["bands"] = tuple(d["bands"])
        if isinstance(d.get("nodata"), str):
            d["nodata"] = float(d["nodata"])
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
    """Base class of dataset readers. Subclasses carry the dataset's constants as class attributes.

    A layout's config (`dataset.layout`) is its constructor's keyword arguments, typed with the aliases of
    `segplat.schema` (nested sections, e.g. one modality's settings, are `@section` dataclasses, built with
    `build_section`): the config walker refuses any other key or a value of another type before anything is read,
    so a constructor keeps only the rules between its keys.
    """

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

    def scanned(self) -> dict[str, list[SampleRef]]:
        """`scan()` once per layout object: the store's fingerprint and its writer see the same listing."""
        if getattr(self, "_scanned", None) is None:
            self._scanned = self.scan()
        return self._scanned

    def sources_digest(self) -> str:
        """A digest of every source file a store is built from (split, sample, path, size, mtime), so that files
        added, removed or rewritten under the root give another fingerprint, never a stale store."""
        h = hashlib.sha256()
        for split, refs in sorted(self.scanned().items()):
            for ref in refs:
                h.update(f"{split}\0{ref.id}\0".encode())
                for key, path in sorted(ref.files.items()):
                    try:
                        st = os.stat(path)
                        h.update(f"{key}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
                    except OSError:  # the layout reports unreadable files when it reads them
                        h.update(f"{key}\0{path}\0missing\0".encode())
        return h.hexdigest()[:16]

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


# -- config helpers -------------------------------------------------------------------------------------


def band_names(select: Sequence[str | int] | None, documented: Sequence[str], key: str, what: str) -> tuple[str, ...]:
    """Bands picked by name or 1-based index from a documented band list -> their names (all when None)."""
    if select is None:
        return tuple(documented)
    out = []
    for item in to_plain(select):
        if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= len(documented):
            out.append(documented[item - 1])
        elif isinstance(item, str) and item in documented:
            out.append(item)
        else:
            raise ConfigError(f"{key} names {item!r}, which {what} does not have; choose band names from "
                              f"{', '.join(documented)} or 1-based indexes 1..{len(documented)}.")
    if not out:
        raise ConfigError(f"{key} is empty; list at least one band (or null for all).")
    return tuple(out)


def build_layout(cfg: Mapping[str, Any], root: str | None, key: str = "dataset.layout") -> Layout:
    """Instantiate `dataset.layout` after checking its keys against the layout's signature (before any file is read;
    the tasks checked them with the whole config already, direct callers get the same refusals here)."""
    from hydra.utils import get_class, instantiate

    from segplat.schema import check_targets, signature_of

    target = cfg.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception as err:
        raise ConfigError(f"{key}._target_={target} cannot be imported; check the dataset config.") from err
    doc = "see docs/user-project.md, \"The layout contract\""
    if not (isinstance(cls, type) and issubclass(cls, Layout)):
        raise ConfigError(f"{key}._target_={target} is not a segplat.data.layouts.base.Layout subclass; a "
                          f"layout subclasses Layout and defines modalities, scan and read ({doc}).")
    if cls.__abstractmethods__:
        missing = " or ".join(sorted(cls.__abstractmethods__))
        raise ConfigError(f"{key}._target_={target} does not define {missing}, which every Layout defines ({doc}).")
    check_targets(cfg, root=key)
    if "root" in cfg:  # a constructor argument, but given from dataset.root: the layout's own would be overridden
        keys = [k for k in signature_of(str(target)).params if k != "root"]
        raise ConfigError(not_a_key(f"{key}.root", key, keys, "the data's folder is dataset.root"))
    try:
        layout = instantiate(cfg, root=root)
    except Exception as err:  # Hydra wraps what the constructor raises; the user's error is the one to show
        from segplat.utils.task import user_error_in

        user_error = user_error_in(err)
        if user_error is None:
            raise
        raise user_error from None
    if not layout.classes or len(layout.palette) != len(layout.classes):
        raise ConfigError(f"{key}._target_={target} has {len(layout.classes)} classes and "
                          f"{len(layout.palette)} palette colours; set Layout.classes (at least one name) and "
                          f"Layout.palette (one RGB triple per class), as class constants or in __init__ ({doc}).")
    return layout
