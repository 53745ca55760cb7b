"""Device-side preprocessing of a batch: float conversion, photometric augmentation of optical
modalities, and per-band normalisation with no-data masked out.

The arithmetic is written once against an array module `xp`: CuPy when the batch lives on a
CUDA device (zero-copy through DLPack, run on torch's current stream through
`cupy.cuda.ExternalStream`, so no synchronisation is needed and the order with the model's
kernels is kept), NumPy on the CPU (zero-copy through `Tensor.numpy()`). A CUDA batch without
CuPy installed takes the NumPy path through host memory (correct, slower; warned once).

Photometric ops work in a *unit range* per band, (x - p2) / (p98 - p2) from the store's
statistics, so one `brightness: 0.1` means the same on 8-bit RGB and 16-bit reflectance; they
run before normalisation and only on `optical` modalities (never radar, DSM or air grids).
No-data pixels (the modality's nodata value, NaN, temporal padding) are 0 in the output.

Random parameters are drawn on the host from a generator seeded by (seed, epoch, step), so a
resumed run draws the same augmentations, and both array modules see identical parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from segplat.data.layouts.base import ModalitySpec
from segplat.schema import NonNegativeFloat, PositiveInt, Probability, section

log = logging.getLogger(__name__)
_warned_no_cupy = False


def array_module(tensor: torch.Tensor):
    """CuPy for CUDA tensors (when installed), NumPy for CPU tensors, None for CUDA without CuPy."""
    if tensor.is_cuda:
        try:
            import cupy
        except ImportError:
            return None
        return cupy
    return np


def to_xp(tensor: torch.Tensor, xp):
    """Zero-copy view of a tensor in `xp` (NumPy: shared CPU memory; CuPy: DLPack)."""
    if xp is np:
        return tensor.detach().numpy()
    return xp.from_dlpack(tensor.detach())


def from_xp(array, xp, like: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-copy tensor over an `xp` array."""
    if xp is np:
        return torch.from_numpy(np.ascontiguousarray(array))
    return torch.from_dlpack(array)


def box_mean(xp, u, k: int):
    """Mean over a k x k window (edge-replicated) on the last two axes, via an integral image in float64
    (float32 sums over large tiles lose the small differences the window mean is made of)."""
    r = k // 2
    pad = [(0, 0)] * (u.ndim - 2) + [(r + 1, k - r - 1), (r + 1, k - r - 1)]
    p = xp.pad(u.astype(xp.float64), pad, mode="edge")
    # zero the first row/column so that c[y + k] - c[y] is the sum of rows y+1 .. y+k of the padding
    p[..., 0, :] = 0
    p[..., :, 0] = 0
    c = xp.cumsum(xp.cumsum(p, axis=-2), axis=-1)
    h, w = u.shape[-2:]
    s = c[..., k:k + h, k:k + w] - c[..., 0:h, k:k + w] - c[..., k:k + h, 0:w] + c[..., 0:h, 0:w]
    return (s / (k * k)).astype(xp.float32)


@section
class PhotometricAugment:
    """Per-sample photometric jitter in the unit range (`dataset.photometric`); each op applies with probability `p`.

    brightness: additive offset in U(-b, b); contrast: factor in U(1-c, 1+c) around the sample's
    mean per band; gamma: exponent exp(U(-g, g)) on the [0, 1] part; saturation: factor in
    U(1-s, 1+s) of the distance to the band mean (>= 2 bands); hue: rotation in U(-h, h) degrees
    around the grey axis (3-band modalities only); local_contrast: CLAHE-like strength in U(0, a)
    of `clip(u - box_mean(u, local_window), +-local_clip)` added back (clip-limited local contrast).
    """

    brightness: NonNegativeFloat = 0.1
    contrast: NonNegativeFloat = 0.1
    gamma: NonNegativeFloat = 0.0
    saturation: NonNegativeFloat = 0.0
    hue: NonNegativeFloat = 0.0
    local_contrast: NonNegativeFloat = 0.0
    local_window: PositiveInt = 15
    local_clip: NonNegativeFloat = 0.2
    p: Probability = 0.8

    def params(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Host-side draws for a batch of n samples (identity values where an op is off)."""
        def draw(strength: float, lo: float, hi: float, identity: float) -> np.ndarray:
            apply = rng.random(n) < self.p
            vals = rng.uniform(lo, hi, n)
            return np.where(apply & (strength > 0), vals, identity).astype(np.float32)

        b, c, g, s, h, a = (float(self.brightness), float(self.contrast), float(self.gamma),
                            float(self.saturation), float(self.hue), float(self.local_contrast))
        return {
            "brightness": draw(b, -b, b, 0.0),
            "contrast": draw(c, 1 - c, 1 + c, 1.0),
            "gamma": np.exp(draw(g, -g, g, 0.0)).astype(np.float32),
            "saturation": draw(s, 1 - s, 1 + s, 1.0),
            "hue": draw(h, -h, h, 0.0),
            "local": draw(a, 0.0, a, 0.0),
        }

    def apply(self, xp, u, params: Mapping[str, np.ndarray], valid=None):
        """u: (B, [T,] C, H, W) float32 in the unit range; valid: same shape bool or None."""
        bshape = (-1,) + (1,) * (u.ndim - 1)
        channel_axis = u.ndim - 3
        reduce_axes = tuple(a for a in range(1, u.ndim) if a != channel_axis)

        def per_sample(name: str):
            return xp.asarray(params[name]).reshape(bshape)

        if valid is None:
            mean = u.mean(axis=reduce_axes, keepdims=True)
        else:
            w = valid.astype(xp.float32)
            mean = (u * w).sum(axis=reduce_axes, keepdims=True) / xp.maximum(w.sum(axis=reduce_axes, keepdims=True), 1)
            u = xp.where(valid, u, mean)  # no-data takes the band mean: it must not drive local statistics
        if float(self.gamma) > 0:
            clipped = xp.clip(u, 0.0, 1.0)
            u = u + (clipped ** per_sample("gamma") - clipped)
            mean = u.mean(axis=reduce_axes, keepdims=True) if valid is None else \
                (u * w).sum(axis=reduce_axes, keepdims=True) / xp.maximum(w.sum(axis=reduce_axes, keepdims=True), 1)
        if float(self.contrast) > 0:
            u = (u - mean) * per_sample("contrast") + mean
        if float(self.brightness) > 0:
            u = u + per_sample("brightness")
        channels = u.shape[channel_axis]
        if float(self.saturation) > 0 and channels >= 2:
            grey = u.mean(axis=channel_axis, keepdims=True)
            u = grey + (u - grey) * per_sample("saturation")
        if float(self.hue) > 0 and channels == 3:
            u = self._rotate_hue(xp, u, params["hue"], channel_axis)
        if float(self.local_contrast) > 0:
            k = int(self.local_window)
            detail = xp.clip(u - box_mean(xp, u, k), -float(self.local_clip), float(self.local_clip))
            u = u + per_sample("local") * detail
        return u.astype(xp.float32)

    @staticmethod
    def _rotate_hue(xp, u, degrees: np.ndarray, channel_axis: int):
        """Rotate each pixel's (r, g, b) around the grey axis (1, 1, 1): hue shift, luminance kept."""
        theta = np.deg2rad(degrees.astype(np.float64))
        cos, sin = np.cos(theta), np.sin(theta)
        k = 1.0 / 3.0
        r3 = math.sqrt(k)
        # Rodrigues' rotation about the unit vector (1, 1, 1)/sqrt(3), one matrix per sample
        mats = np.empty((len(theta), 3, 3))
        for i in range(3):
            for j in range(3):
                cross = 0.0 if i == j else (r3 if (j - i) % 3 == 2 else -r3)
                mats[:, i, j] = cos * (i == j) + sin * cross + (1 - cos) * k
        bshape = (-1,) + (1,) * (u.ndim - 1)
        planes = [xp.take(u, [c], axis=channel_axis) for c in range(3)]
        out = []
        for i in range(3):
            acc = 0
            for j in range(3):
                acc = acc + xp.asarray(mats[:, i, j].astype(np.float32)).reshape(bshape) * planes[j]
            out.append(acc)
        return xp.concatenate(out, axis=channel_axis)


class Preprocessor:
    """Turns a collated batch of native-dtype arrays into normalised float32 model inputs.

    Output: one float32 tensor per modality, plus the `<m>_dates` and `<m>_time_mask` tensors of
    temporal modalities passed through unchanged (temporal models need them).
    """

    def __init__(self, specs: Mapping[str, ModalitySpec], stats: Mapping[str, Mapping[str, Sequence[float]]],
                 modalities: Sequence[str], photometric: PhotometricAugment | None = None, seed: int = 0) -> None:
        self.specs = dict(specs)
        self.modalities = list(modalities)
        self.photometric = photometric
        self.seed = int(seed)
        self.mean = {m: np.asarray(stats[m]["mean"], np.float32) for m in self.modalities}
        self.std = {m: np.maximum(np.asarray(stats[m]["std"], np.float32), 1e-6) for m in self.modalities}
        self.lo, self.span = {}, {}
        for m in self.modalities:
            lo = np.asarray(stats[m].get("p2", stats[m]["mean"]), np.float32)
            hi = np.asarray(stats[m].get("p98", stats[m]["mean"]), np.float32)
            span = hi - lo
            # a constant band has no p2..p98 spread: fall back to 4 std (about the same span for a normal band)
            self.lo[m] = lo
            self.span[m] = np.where(span > 1e-6, span, np.maximum(4 * self.std[m], 1e-6)).astype(np.float32)

    def invalid(self, xp, x, modality: str, time_mask=None):
        """True where a value is no-data (nodata value, NaN, or a padded date)."""
        spec = self.specs[modality]
        bad = xp.isnan(x)
        if spec.nodata is not None and not (isinstance(spec.nodata, float) and math.isnan(spec.nodata)):
            bad |= x == xp.float32(spec.nodata)
        if time_mask is not None and x.ndim == 5:
            bad |= ~time_mask.astype(bool)[:, :, None, None, None]
        return bad

    def normalise(self, xp, x, modality: str, invalid=None):
        """(B, [T,] C, H, W) -> float32 (x - mean) / std, no-data set to 0."""
        x = x.astype(xp.float32)
        if invalid is None:
            invalid = self.invalid(xp, x, modality)
        shape = (1,) * (x.ndim - 3) + (-1, 1, 1)
        mean = xp.asarray(self.mean[modality]).reshape(shape)
        std = xp.asarray(self.std[modality]).reshape(shape)
        return xp.where(invalid, xp.float32(0.0), (x - mean) / std).astype(xp.float32)

    def process(self, xp, x, modality: str, params: Mapping[str, np.ndarray] | None, time_mask=None):
        """The whole per-modality computation on `xp` arrays (shared by NumPy and CuPy)."""
        x = x.astype(xp.float32)
        invalid = self.invalid(xp, x, modality, time_mask)
        if params is not None and self.photometric is not None:
            shape = (1,) * (x.ndim - 3) + (-1, 1, 1)
            lo = xp.asarray(self.lo[modality]).reshape(shape)
            span = xp.asarray(self.span[modality]).reshape(shape)
            u = self.photometric.apply(xp, (x - lo) / span, params, valid=~invalid)
            x = u * span + lo
        return self.normalise(xp, x, modality, invalid)

    def __call__(self, batch: Mapping[str, torch.Tensor], train: bool = False, epoch: int = 0,
                 step: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, step, 7])
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            t = batch[m]
            params = None
            if train and self.photometric is not None and self.specs[m].optical:
                params = self.photometric.params(rng, t.shape[0])
            tm = batch.get(f"{m}_time_mask")
            out[m] = self._run(t, m, params, tm)
            for key in (f"{m}_dates", f"{m}_time_mask"):
                if key in batch:
                    out[key] = batch[key]
        return out

    def _run(self, t: torch.Tensor, m: str, params, time_mask: torch.Tensor | None) -> torch.Tensor:
        xp = array_module(t)
        if xp is None:  # CUDA without CuPy: the NumPy path through host memory
            global _warned_no_cupy
            if not _warned_no_cupy:
                log.warning("CuPy is not installed: preprocessing CUDA batches on the CPU; "
                            "`pip install segplat[gpu]` keeps it on the GPU.")
                _warned_no_cupy = True
            res = self._run(t.cpu(), m, params, None if time_mask is None else time_mask.cpu())
            return res.to(t.device, non_blocking=True)
        if xp is np:
            tm = None if time_mask is None else to_xp(time_mask, np)
            return from_xp(self.process(np, to_xp(t, np), m, params, tm), np)
        import cupy

        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream, t.device.index)
        with cupy.cuda.Device(t.device.index), stream:
            tm = None if time_mask is None else to_xp(time_mask.contiguous(), cupy)
            y = self.process(cupy, to_xp(t.contiguous(), cupy), m, params, tm)
            return from_xp(cupy.ascontiguousarray(y), cupy)
