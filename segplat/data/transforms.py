"""Geometric augmentation on the CPU, applied identically to every modality and the label.

Works on one sample dict of numpy arrays ((C, h, w) or (T, C, h, w) per modality, (H, W) label)
where modalities may have their own resolution (a 64x64 grid under a 512x512 image). Only
transforms that map pixel grids onto themselves exactly are used here (flips, rot90), so
different resolutions stay aligned; resampling transforms live with the data issue's extras.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GeometricAugment:
    """Random horizontal/vertical flips and 90-degree rotations with the given probabilities."""

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5

    def __call__(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        ops = []
        if rng.random() < self.hflip:
            ops.append(("flip", -1))
        if rng.random() < self.vflip:
            ops.append(("flip", -2))
        if rng.random() < self.rot90:
            ops.append(("rot", int(rng.integers(1, 4))))
        if not ops:
            return sample
        out = {}
        for key, arr in sample.items():
            if not _is_spatial(key, arr):
                out[key] = arr
                continue
            for op, arg in ops:
                arr = np.flip(arr, axis=arg) if op == "flip" else np.rot90(arr, k=arg, axes=(-2, -1))
            out[key] = np.ascontiguousarray(arr)
        return out


def _is_spatial(key: str, arr: np.ndarray) -> bool:
    return isinstance(arr, np.ndarray) and arr.ndim >= 2 and not key.endswith(("_dates", "_time_mask"))
