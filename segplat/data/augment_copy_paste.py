"""Copy-paste of instances (e.g. thick / thin cloud) from another tile of the same split.

Why: cloud classes are rare and their shapes vary much more than the ground under them; pasting
whole connected cloud regions from another tile, with their pixels in *every* modality (RGB and
NIR alike, so the NIR signature that separates thin cloud stays consistent), multiplies the
cloud/ground combinations the model sees without inventing pixels.

An instance is a connected region (8-connectivity) of the chosen classes in a random crop of
another tile (drawn centred on a pixel of those classes). Modalities at other resolutions get the
mask sampled at their pixel centres. Randomness comes only from the per-sample generator.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from annotated_types import MinLen

from segplat.data.store import PatchStore
from segplat.errors import ConfigError
from segplat.schema import Hint, NonNegativeInt, PositiveInt, Probability, section


class StoreDonor:
    """Random crops of `patch_size` from a store split; opened lazily per process (fork/spawn safe)."""

    def __init__(self, store_path: str, split: str, modalities: Sequence[str], patch_size: int) -> None:
        self.store_path, self.split = str(store_path), split
        self.modalities = list(modalities)
        self.patch_size = int(patch_size)
        store = PatchStore(self.store_path)
        self.specs = {m: store.modalities[m] for m in self.modalities}
        self.tile_size = store.tile_size
        self.tiles = [i for i, m in enumerate(store.tiles_meta(split)) if m is not None]
        self._group = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"], state["_pid"] = None, None
        return state

    def _open(self):
        if self._group is None or self._pid != os.getpid():
            self._group = PatchStore(self.store_path).split(self.split)
            self._pid = os.getpid()
        return self._group

    def draw(self, rng: np.random.Generator, classes: Sequence[int], tries: int = 4) -> dict[str, np.ndarray] | None:
        """A crop holding some of `classes`, or None when `tries` random tiles held none."""
        group = self._open()
        p, span = self.patch_size, self.tile_size - self.patch_size
        for _ in range(tries):
            tile = int(self.tiles[int(rng.integers(len(self.tiles)))])
            label = np.asarray(group["label"][tile])
            ys, xs = np.nonzero(np.isin(label, classes))
            if len(ys) == 0:
                continue
            k = int(rng.integers(len(ys)))
            y = int(np.clip(ys[k] - p // 2, 0, max(span, 0)))
            x = int(np.clip(xs[k] - p // 2, 0, max(span, 0)))
            out = {"label": label[y:y + p, x:x + p]}
            for m in self.modalities:
                s = self.specs[m].scale
                yy, xx, pp = round(y * s), round(x * s), round(p * s)
                out[m] = np.asarray(group[m][tile, ..., yy:yy + pp, xx:xx + pp])
            return out
        return None


def sample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label-grid mask at another grid, sampled at that grid's pixel centres (nearest)."""
    if mask.shape == tuple(shape):
        return mask
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1)
    return mask[ys][:, xs]


@section
class CopyPasteConfig:
    """`dataset.augment.copy_paste`: which classes to paste, how often and how many regions."""

    classes: Annotated[list[NonNegativeInt], MinLen(1), Hint("the class indices to paste, e.g. [1, 2] for thick "
                                                             "and thin cloud")]
    p: Probability = 0.5
    max_instances: PositiveInt = 3
    min_area: NonNegativeInt = 16
    tries: PositiveInt = 4


class CopyPaste:
    """Paste 1..`max_instances` connected regions of `classes` from a donor crop, with probability `p`."""

    def __init__(self, donor: Any, classes: Sequence[int], p: float = 0.5, max_instances: int = 3,
                 min_area: int = 16, ignore_index: int = 255, tries: int = 4) -> None:
        specs = getattr(donor, "specs", {})
        temporal = [m for m, s in specs.items() if getattr(s, "temporal", False)]
        if temporal:
            raise ConfigError(f"dataset.augment.copy_paste cannot paste into temporal modalities {temporal} (each "
                              "date has its own clouds); remove copy_paste for this dataset.")
        self.donor = donor
        self.classes = [int(c) for c in classes]
        self.p, self.max_instances, self.min_area = float(p), int(max_instances), int(min_area)
        self.ignore_index, self.tries = int(ignore_index), int(tries)

    def __call__(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if rng.random() >= self.p:
            return sample
        src = self.donor.draw(rng, self.classes, self.tries)
        if src is None:
            return sample
        label = sample["label"]
        if src["label"].shape != label.shape:
            return sample
        mask = np.isin(src["label"], self.classes).astype(np.uint8)
        import cv2  # only copy-paste needs OpenCV here: the loader imports without it

        n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        ids = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= self.min_area]
        if not ids:
            return sample
        k = int(rng.integers(1, min(self.max_instances, len(ids)) + 1))
        chosen = rng.choice(ids, size=k, replace=False)
        paste = np.isin(comp, chosen)
        out = dict(sample)
        new_label = label.copy()
        new_label[paste] = src["label"][paste]
        out["label"] = new_label
        for key, arr in sample.items():
            if key == "label" or key not in src or not isinstance(arr, np.ndarray) or arr.ndim < 2:
                continue
            pm = sample_mask(paste, arr.shape[-2:])
            new = arr.copy()
            new[..., pm] = src[key][..., pm]
            out[key] = new
        return out
