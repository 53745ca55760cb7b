"""The Kaggle clouds submission: run-length encoding of predictions, and its decoder.

Competition format (docs/datasets.md): `Image_Label,EncodedPixels`, one row per test image;
`Image_Label` is the file name; `EncodedPixels` encodes the whole 3-channel BGR colour prediction
flattened as `img.T.flatten()` (plane B, then G, then R, each plane column-major), padded with a 0
at each end, runs of non-zero values as 1-indexed "start length" pairs. The BGR colours are
background (0,0,0), thick cloud (0,0,255), thin cloud (0,255,0), cloud shadow (0,255,255), so
the B plane is always empty, G = thin ∪ shadow and R = thick ∪ shadow.

The older convention (one row per image and class, `<image>_<class>`, a binary mask) is the
`per_class` option.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from segplat.utils.io import atomic_write

# class index -> BGR colour, in the clouds layout's class order
CLOUDS_BGR = ((0, 0, 0), (0, 0, 255), (0, 255, 0), (0, 255, 255))
CLOUDS_CLASSES = ("background", "thick_cloud", "thin_cloud", "cloud_shadow")


def rle_encode(flat: np.ndarray) -> str:
    """Runs of non-zero values of a 1-D array as 1-indexed 'start length' pairs."""
    nonzero = (np.asarray(flat).ravel() != 0).astype(np.int8)
    padded = np.concatenate([[0], nonzero, [0]])
    changes = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    starts, ends = changes[::2], changes[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def rle_decode(encoded: str, length: int) -> np.ndarray:
    """The 0/1 array of `length` elements that `rle_encode` describes."""
    out = np.zeros(length, np.uint8)
    values = encoded.split()
    if len(values) % 2:
        raise ValueError(f"an RLE string needs start/length pairs; got {len(values)} numbers.")
    for start, run in zip(values[::2], values[1::2]):
        s = int(start) - 1
        out[s:s + int(run)] = 1
    return out


def classes_to_bgr(pred: np.ndarray, colours: Sequence[Sequence[int]] = CLOUDS_BGR) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 BGR image."""
    lut = np.zeros((max(256, len(colours)), 3), np.uint8)
    for i, c in enumerate(colours):
        lut[i] = c
    return lut[pred.astype(np.intp)]


def encode_colour_prediction(pred: np.ndarray) -> str:
    """The competition's EncodedPixels for one (H, W) class map."""
    bgr = classes_to_bgr(pred)
    return rle_encode(bgr.T.flatten())


def decode_colour_prediction(encoded: str, height: int, width: int) -> np.ndarray:
    """Inverse of `encode_colour_prediction`: (H, W) class indices (0 background .. 3 shadow)."""
    planes = rle_decode(encoded, 3 * height * width).reshape(3, width, height).transpose(0, 2, 1)  # (3, H, W)
    g, r = planes[1].astype(bool), planes[2].astype(bool)
    out = np.zeros((height, width), np.uint8)
    out[r & ~g] = 1
    out[g & ~r] = 2
    out[g & r] = 3
    return out


def encode_binary_mask(mask: np.ndarray) -> str:
    """Older convention: a binary (H, W) mask, column-major, 1-indexed runs."""
    return rle_encode(np.asarray(mask).T.flatten())


def write_submission(rows: Iterable[tuple[str, np.ndarray]], path: str | Path, per_class: bool = False,
                     classes: Sequence[str] = CLOUDS_CLASSES) -> Path:
    """Write submission.csv atomically from (file name, (H, W) class map) pairs."""
    records: list[tuple[str, str]] = []
    for name, pred in rows:
        if per_class:
            for k, cls in enumerate(classes):
                if k == 0:
                    continue
                records.append((f"{name}_{cls}", encode_binary_mask(pred == k)))
        else:
            records.append((name, encode_colour_prediction(pred)))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["Image_Label", "EncodedPixels"])
            writer.writerows(records)

    return atomic_write(path, write)


def read_submission(path: str | Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != ["Image_Label", "EncodedPixels"]:
            raise ValueError(f"{path}: the header must be Image_Label,EncodedPixels, not {reader.fieldnames}.")
        return {row["Image_Label"]: row["EncodedPixels"] for row in reader}
