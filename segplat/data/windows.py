"""Window geometry on the label grid: where windows start along one axis, and the one grid-alignment rule (a
window or patch maps to whole pixels of every modality). The predictor and the training patches share both."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from fractions import Fraction

from segplat.errors import ConfigError


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of `window`-pixel windows every `stride` pixels that cover [0, length); the last window ends
    at `length` instead of running past it. The one owner of this rule: the predictor's sliding windows
    (`segplat.inference`) and PatchDataset's validation grid (stride = window) both call it."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _pixels(scale: float) -> Fraction:
    """A modality's pixels per label pixel as an exact fraction (0.125 -> 1/8)."""
    return Fraction(scale).limit_denominator(1024)


def grid_alignment(scales: Iterable[float]) -> int:
    """Label pixels a window's start and size must be a multiple of so that they fall on whole pixels of every
    modality (8 for a 1/8 grid, the least common multiple for several): a start between coarse pixels would pair
    the window with ground half a pixel away."""
    align = 1
    for scale in scales:
        denominator = _pixels(scale).denominator
        align = align * denominator // math.gcd(align, denominator)
    return align


def check_grid_alignment(size: int, scales: Mapping[str, float], key: str) -> None:
    """Refuse a window or patch size (`key`: the config key that set it) that does not map to whole pixels of every
    modality (name -> scale)."""
    align = grid_alignment(scales.values())
    if size % align:
        coarse = [f"{m} (scale {s:g})" for m, s in scales.items() if (_pixels(s) * size).denominator != 1]
        raise ConfigError(f"{key}={size} does not map to whole pixels of {', '.join(coarse)}; use a multiple of "
                          f"{align}.")
