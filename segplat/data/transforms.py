"""Geometric augmentation on the CPU, applied identically to every modality and the label.

Works on one sample dict of numpy arrays ((C, h, w) or (T, C, h, w) per modality, (H, W) label)
where modalities may have their own resolution (a 64x64 grid under a 512x512 image). Flips and
rot90 map pixel grids onto themselves exactly. Resampling transforms (random zoom-crop,
shift-scale-rotate) are one affine matrix in label-pixel coordinates, conjugated into each
modality's grid (`T A T^-1` with `T: x_m = s (x + 0.5) - 0.5`), so a grid at 1/8 resolution moves
by 1/8 of the translation and stays aligned with the label. Labels are warped with nearest
neighbour and the ignore index as border; data with linear interpolation (or nearest), the
modality's no-data value as border, and no-data never blended into valid pixels.

Randomness comes only from the generator passed in (PatchDataset seeds it per sample, epoch and
seed), which is what makes runs reproducible across worker counts and exactly resumable.
Photometric augmentation runs on the device (`segplat.data.preprocess`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal

import numpy as np
from annotated_types import Ge

from segplat.data.augment_copy_paste import CopyPasteConfig
from segplat.errors import ConfigError
from segplat.messages import must_be
from segplat.schema import Hint, NonNegativeFloat, OpenFraction, Probability, build_section, section

Sample = dict[str, np.ndarray]
MAX_CV_CHANNELS = 256  # cv2 warps at most 512 channels at once; stay well below
ZoomFactor = Annotated[float, Ge(1)]


@section
class GeometricConfig:
    """The geometric keys of `dataset.augment`: probabilities `hflip`, `vflip`, `rot90`, `scale_crop`, `ssr`;
    `scale_range` bounds the zoom of scale_crop (>= 1: a window of patch/zoom pixels is cut at a random place and
    resized to the patch); `shift_limit` (fraction of the patch), `scale_limit` (fraction), `rotate_limit`
    (degrees) bound ssr."""

    hflip: Probability = 0.5
    vflip: Probability = 0.5
    rot90: Probability = 0.5
    scale_crop: Probability = 0.0
    scale_range: Annotated[tuple[ZoomFactor, ZoomFactor], Hint("zoom factors [lo, hi] with 1 <= lo <= hi; the crop "
                                                               "never leaves the patch")] = (1.0, 1.5)
    ssr: Probability = 0.0
    shift_limit: NonNegativeFloat = 0.0625
    scale_limit: OpenFraction = 0.1
    rotate_limit: NonNegativeFloat = 30.0
    interpolation: Literal["linear", "nearest"] = "linear"


@dataclass
class GeometricAugment(GeometricConfig):
    """Flips, rot90 (exact), random zoom-crop and shift-scale-rotate (resampled), one draw per sample.

    `nodata` (modality -> value) is the border for data; `ignore_index` the border for the label.
    """

    ignore_index: int = 255
    nodata: Mapping[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.scale_range)
        if lo > hi:  # each bound's range is the type's; their order is this rule
            raise ConfigError(must_be("dataset.augment.scale_range", list(self.scale_range), "[lo, hi] with lo <= hi",
                                      "zoom factors from 1 up"))

    # -- parameters -----------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, size: int) -> tuple[list[tuple[str, int]], np.ndarray | None]:
        """The exact ops and the 3x3 forward affine (label pixels) or None; the draw order is fixed."""
        ops: list[tuple[str, int]] = []
        if rng.random() < self.hflip:
            ops.append(("flip", -1))
        if rng.random() < self.vflip:
            ops.append(("flip", -2))
        if rng.random() < self.rot90:
            ops.append(("rot", int(rng.integers(1, 4))))
        affine = None
        if self.scale_crop > 0 and rng.random() < self.scale_crop:
            lo, hi = (float(v) for v in self.scale_range)
            zoom = float(rng.uniform(lo, hi))
            span = size - size / zoom
            y0, x0 = float(rng.uniform(0, span)), float(rng.uniform(0, span))
            # dst = zoom * (src - origin + 0.5) - 0.5 (pixel centres at integers)
            crop = np.array([[zoom, 0, zoom * (0.5 - x0) - 0.5], [0, zoom, zoom * (0.5 - y0) - 0.5], [0, 0, 1]])
            affine = crop
        if self.ssr > 0 and rng.random() < self.ssr:
            angle = float(rng.uniform(-self.rotate_limit, self.rotate_limit))
            scale = float(rng.uniform(1 - self.scale_limit, 1 + self.scale_limit))
            dx, dy = (float(v) * size for v in rng.uniform(-self.shift_limit, self.shift_limit, 2))
            c = (size - 1) / 2.0
            import cv2  # imported where resampling needs it: flips/rot90 run without OpenCV (bare GPU images)

            m = np.vstack([cv2.getRotationMatrix2D((c, c), angle, scale), [0, 0, 1]])
            m[0, 2] += dx
            m[1, 2] += dy
            affine = m if affine is None else m @ affine
        return ops, affine

    # -- application ----------------------------------------------------------------------------
    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        label = sample.get("label")
        size = int(label.shape[-1]) if label is not None else _first_spatial_size(sample)
        ops, affine = self.draw(rng, size)
        if not ops and affine is None:
            return sample
        out = {}
        for key, arr in sample.items():
            if not _is_spatial(key, arr):
                out[key] = arr
                continue
            for op, arg in ops:
                arr = np.flip(arr, axis=arg) if op == "flip" else np.rot90(arr, k=arg, axes=(-2, -1))
            if affine is not None:
                if key == "label":
                    arr = warp(arr, affine, 1.0, nearest=True, border=self.ignore_index)
                else:
                    s = arr.shape[-1] / size
                    arr = warp(arr, affine, s, nearest=self.interpolation == "nearest",
                               border=self.nodata.get(key), mask_nodata=True)
            # flips and rotations stay views: collate's stack makes the one copy every patch needs anyway
            out[key] = arr
        return out


def modality_affine(affine: np.ndarray, scale: float) -> np.ndarray:
    """The label-grid affine expressed in a grid with `scale` pixels per label pixel."""
    if scale == 1.0:
        return affine
    t = np.array([[scale, 0, 0.5 * (scale - 1)], [0, scale, 0.5 * (scale - 1)], [0, 0, 1.0]])
    return t @ affine @ np.linalg.inv(t)


def _invalid(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    bad = np.isnan(arr) if np.issubdtype(arr.dtype, np.floating) else np.zeros(arr.shape, bool)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        bad |= arr == nodata
    return bad


def _warp_planes(planes: np.ndarray, m: np.ndarray, flags: int, border_mode: int, border: float) -> np.ndarray:
    """(N, h, w) -> (N, h, w) through cv2 in chunks (cv2 wants (h, w, channels))."""
    import cv2

    n, h, w = planes.shape
    out = np.empty_like(planes)
    for i in range(0, n, MAX_CV_CHANNELS):
        chunk = np.ascontiguousarray(planes[i:i + MAX_CV_CHANNELS].transpose(1, 2, 0))
        res = cv2.warpAffine(chunk, m, (w, h), flags=flags, borderMode=border_mode, borderValue=border)
        out[i:i + MAX_CV_CHANNELS] = res.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def warp(arr: np.ndarray, affine: np.ndarray, scale: float, nearest: bool, border: float | None,
         mask_nodata: bool = False) -> np.ndarray:
    """Warp (..., h, w) with the label-grid forward affine; pixels from outside become `border`.

    With linear interpolation and `mask_nodata`, any output pixel whose neighbourhood touches a
    no-data value (or the outside) takes the nearest-neighbour value instead, so no-data is never
    blended into valid values (a 0-nodata band would otherwise darken every edge it touches).
    """
    import cv2

    m = modality_affine(affine, scale)[:2].astype(np.float64)
    lead, (h, w) = arr.shape[:-2], arr.shape[-2:]
    planes = arr.reshape(-1, h, w)
    fill = 0.0 if border is None else float(border)
    nn = _warp_planes(planes, m, cv2.INTER_NEAREST, cv2.BORDER_CONSTANT, 0.0)
    inside = cv2.warpAffine(np.ones((h, w), np.uint8), m, (w, h), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    if nearest:
        res = nn
    else:
        res = _warp_planes(planes, m, cv2.INTER_LINEAR, cv2.BORDER_REPLICATE, 0.0)
        if mask_nodata:
            bad = _invalid(planes, border)
            if bad.any():
                touched = _warp_planes(bad.astype(np.float32), m, cv2.INTER_LINEAR, cv2.BORDER_REPLICATE, 0.0) > 0
                res = np.where(touched, nn, res)
    if _is_nan(fill) and not np.issubdtype(res.dtype, np.floating):
        fill = 0.0
    res = np.where(inside[None], res, np.asarray(fill).astype(res.dtype))
    return res.reshape(*lead, h, w)


def _is_nan(v: float) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _is_spatial(key: str, arr: Any) -> bool:
    return isinstance(arr, np.ndarray) and arr.ndim >= 2 and not key.endswith(("_dates", "_time_mask"))


def _first_spatial_size(sample: Sample) -> int:
    for key, arr in sample.items():
        if _is_spatial(key, arr):
            return int(arr.shape[-1])
    raise ValueError("the sample has no spatial array")


class Compose:
    """Apply augmentations in order with one generator (copy-paste first, then geometry)."""

    def __init__(self, transforms: Sequence[Callable[[Sample, np.random.Generator], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


@section
class AugmentConfig(GeometricConfig):
    """`dataset.augment`: the geometric keys plus `copy_paste` (segplat.data.augment_copy_paste)."""

    copy_paste: CopyPasteConfig | None = None


def build_augment(cfg: Mapping[str, Any] | AugmentConfig | None, specs: Mapping[str, Any], ignore_index: int,
                  donor: Any | None = None) -> Callable[[Sample, np.random.Generator], Sample] | None:
    """The CPU augmentation from the dataset's `augment:` block (its keys were checked with the config).

    `specs` (modality -> ModalitySpec) gives the no-data borders; `donor` is what copy-paste draws
    other tiles from (`segplat.data.augment_copy_paste.StoreDonor`).
    """
    if not cfg:
        return None
    config = build_section(AugmentConfig, cfg)
    nodata = {m: s.nodata for m, s in specs.items()}
    transforms: list[Callable[[Sample, np.random.Generator], Sample]] = []
    if config.copy_paste:
        from segplat.data.augment_copy_paste import CopyPaste

        if donor is None:
            raise ConfigError("dataset.augment.copy_paste needs the training store to draw instances from.")
        transforms.append(CopyPaste(donor=donor, ignore_index=ignore_index, **asdict(config.copy_paste)))
    geometric = {f.name: getattr(config, f.name) for f in fields(GeometricConfig)}
    transforms.append(GeometricAugment(**geometric, ignore_index=ignore_index, nodata=nodata))
    return transforms[0] if len(transforms) == 1 else Compose(transforms)
