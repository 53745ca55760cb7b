"""Where windows start along one axis: the rule the predictor and the validation grid share."""

from __future__ import annotations


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
