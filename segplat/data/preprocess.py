"""Device-side preprocessing of a batch: float conversion, per-band normalisation with no-data
masked out, and photometric augmentation of optical modalities.

The arithmetic is written once against an array module `xp`: CuPy when the batch lives on a
CUDA device (zero-copy through DLPack, on torch's current stream), NumPy on the CPU (zero-copy
through `Tensor.numpy()`). Random parameters are drawn on the host from a generator seeded by
(seed, epoch, step), so a resumed run draws the same augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segplat.data.layouts.base import ModalitySpec


def array_module(tensor: torch.Tensor):
    """CuPy for CUDA tensors (when installed), NumPy otherwise."""
    if tensor.is_cuda:
        try:
            import cupy
        except ImportError:
            return None
        return cupy
    return np


def to_xp(tensor: torch.Tensor, xp):
    if xp is np:
        return tensor.detach().numpy()
    return xp.from_dlpack(tensor.detach())


def from_xp(array, xp, like: torch.Tensor) -> torch.Tensor:
    if xp is np:
        return torch.from_numpy(np.ascontiguousarray(array))
    return torch.from_dlpack(array)


@dataclass
class PhotometricAugment:
    """Per-sample brightness (additive, in std units) and contrast (multiplicative) jitter."""

    brightness: float = 0.1
    contrast: float = 0.1
    p: float = 0.8

    def params(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        apply = rng.random(n) < self.p
        b = np.where(apply, rng.uniform(-self.brightness, self.brightness, n), 0.0)
        c = np.where(apply, rng.uniform(1 - self.contrast, 1 + self.contrast, n), 1.0)
        return {"brightness": b.astype(np.float32), "contrast": c.astype(np.float32)}

    @staticmethod
    def apply(xp, x, params: Mapping[str, Any]):
        shape = (-1,) + (1,) * (x.ndim - 1)
        c = xp.asarray(params["contrast"]).reshape(shape)
        b = xp.asarray(params["brightness"]).reshape(shape)
        return x * c + b


class Preprocessor:
    """Turns a collated batch of native-dtype arrays into normalised float32 model inputs."""

    def __init__(self, specs: Mapping[str, ModalitySpec], stats: Mapping[str, Mapping[str, Sequence[float]]],
                 modalities: Sequence[str], photometric: PhotometricAugment | None = None, seed: int = 0) -> None:
        self.specs = dict(specs)
        self.modalities = list(modalities)
        self.photometric = photometric
        self.seed = int(seed)
        self.mean = {m: np.asarray(stats[m]["mean"], np.float32) for m in self.modalities}
        self.std = {m: np.maximum(np.asarray(stats[m]["std"], np.float32), 1e-6) for m in self.modalities}

    def normalise(self, xp, x, modality: str):
        """(B, [T,] C, H, W) native dtype -> float32, (x - mean) / std, no-data pixels set to 0."""
        spec = self.specs[modality]
        x = x.astype(xp.float32)
        shape = (1,) * (x.ndim - 3) + (-1, 1, 1)
        mean = xp.asarray(self.mean[modality]).reshape(shape)
        std = xp.asarray(self.std[modality]).reshape(shape)
        invalid = xp.isnan(x)
        if spec.nodata is not None and not (isinstance(spec.nodata, float) and math.isnan(spec.nodata)):
            invalid |= x == spec.nodata
        y = (x - mean) / std
        return xp.where(invalid, xp.float32(0.0), y)

    def __call__(self, batch: Mapping[str, torch.Tensor], train: bool = False, epoch: int = 0,
                 step: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, step, 7])
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            t = batch[m]
            xp = array_module(t)
            if xp is None:  # CUDA without CuPy: the same arithmetic in torch
                out[m] = self._torch_path(t, m, train, rng)
                continue
            x = self.normalise(xp, to_xp(t, xp), m)
            if train and self.photometric is not None and self.specs[m].optical:
                x = self.photometric.apply(xp, x, self.photometric.params(rng, x.shape[0]))
            out[m] = from_xp(xp.ascontiguousarray(x), xp, t)
        return out

    def _torch_path(self, t: torch.Tensor, m: str, train: bool, rng: np.random.Generator) -> torch.Tensor:
        spec = self.specs[m]
        x = t.float()
        shape = (1,) * (x.ndim - 3) + (-1, 1, 1)
        mean = torch.as_tensor(self.mean[m], device=x.device).view(shape)
        std = torch.as_tensor(self.std[m], device=x.device).view(shape)
        invalid = torch.isnan(x)
        if spec.nodata is not None and not (isinstance(spec.nodata, float) and math.isnan(spec.nodata)):
            invalid |= x == spec.nodata
        y = torch.where(invalid, torch.zeros((), device=x.device), (x - mean) / std)
        if train and self.photometric is not None and spec.optical:
            p = self.photometric.params(rng, y.shape[0])
            s = (-1,) + (1,) * (y.ndim - 1)
            y = y * torch.as_tensor(p["contrast"], device=y.device).view(s) + torch.as_tensor(
                p["brightness"], device=y.device).view(s)
        return y
