"""Inference building blocks: a model and its preprocessing from a checkpoint alone, and
sliding-window prediction over scenes of any size with overlap, weighted blending and TTA.

A checkpoint carries its resolved config and the data facts (classes, palette, band names,
normalisation statistics), so prediction needs neither the run folder nor the training data. The
stored config is untrusted: only its checked `model` and `dataset` parts are ever built
(`segplat.engine.checkpoint.inference_config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn import functional as F
from tqdm.auto import tqdm

from segplat.data.layouts.base import ModalitySpec
from segplat.data.preprocess import Preprocessor
from segplat.engine.checkpoint import check_belongs_to_run, find_checkpoint, inference_config, load_checkpoint
from segplat.errors import CheckpointError, ConfigError
from segplat.models.build import build_model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocessor: Preprocessor
    specs: dict[str, ModalitySpec]
    classes: list[str]
    palette: list[list[int]]
    ignore_index: int
    patch_size: int
    config: DictConfig
    checkpoint: Path

    @property
    def modalities(self) -> list[str]:
        return list(self.specs)


def load_for_inference(location: str | Path, device: str | torch.device = "cpu",
                       prefer: str = "best.ckpt") -> LoadedModel:
    """Build the model of a run from a run folder or a .ckpt (best checkpoint preferred).

    `config` of the result holds only the checkpoint's checked `model` and `dataset` parts.
    """
    path = find_checkpoint(location, prefer=prefer)
    state = load_checkpoint(path)
    data = state.get("data")
    if not data or not state.get("config"):
        raise CheckpointError(f"checkpoint {path} carries no config or data facts (written by an older segplat); "
                              "predict from a run trained with this version.")
    cfg = inference_config(state, path)
    check_belongs_to_run(location, path, cfg)
    specs = {m: ModalitySpec.from_attrs(a) for m, a in data["modalities"].items()}
    modalities = {m: len(s.bands) for m, s in specs.items()}
    model = build_model(cfg.model, modalities, len(data["classes"]), {m: s.bands for m, s in specs.items()})
    model.load_state_dict(state["model"])
    model.eval().to(device)
    pre = Preprocessor(specs, data["stats"], list(specs))
    return LoadedModel(model, pre, specs, list(data["classes"]), [list(c) for c in data["palette"]],
                       int(data["ignore_index"]), int(data.get("patch_size") or 256), cfg, path)


def blend_weights(size: int, kind: str = "cosine") -> np.ndarray:
    """Window weights that fall towards the borders, so overlapping windows blend without seams."""
    if kind == "uniform":
        return np.ones((size, size), np.float32)
    ramp = 0.5 * (1 - np.cos(2 * np.pi * (np.arange(size) + 0.5) / size))
    w = np.outer(ramp, ramp).astype(np.float32)
    return np.maximum(w, 1e-3)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


class SlidingWindowPredictor:
    """Predict class probabilities for a whole scene (dict of (C, H, W) arrays at each modality's scale)."""

    def __init__(self, loaded: LoadedModel, window: int | None = None, overlap: float = 0.25, batch_size: int = 4,
                 flips: bool = False, scales: Sequence[float] = (1.0,), device: str | torch.device = "cpu",
                 bf16: bool | None = None, progress: bool = True) -> None:
        if not 0 <= overlap < 1:
            raise ConfigError(f"overlap={overlap} must be in [0, 1).")
        self.loaded = loaded
        self.window = int(window or loaded.patch_size)
        self.stride = max(1, round(self.window * (1 - overlap)))
        self.batch_size = int(batch_size)
        self.flips = flips
        self.scales = list(scales)
        self.device = torch.device(device)
        self.bf16 = (self.device.type == "cuda") if bf16 is None else bf16
        self.progress = progress
        for m, spec in loaded.specs.items():
            p = self.window * spec.scale
            if abs(p - round(p)) > 1e-6:
                raise ConfigError(f"window={self.window} does not map to whole pixels of {m} (scale {spec.scale}).")

    @torch.no_grad()
    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = self.loaded.preprocessor({k: v.cpu() for k, v in batch.items()}, train=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        model = self.loaded.model
        views = [(False, False)] + ([(True, False), (False, True)] if self.flips else [])
        total = None
        count = 0
        size = next(iter(inputs.values())).shape[-2:]
        for scale in self.scales:
            for hflip, vflip in views:
                x = {}
                for k, v in inputs.items():
                    if scale != 1.0:
                        v = F.interpolate(v, scale_factor=scale, mode="bilinear", align_corners=False)
                    if hflip:
                        v = v.flip(-1)
                    if vflip:
                        v = v.flip(-2)
                    x[k] = v
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logits = model(x)["out"].float()
                if hflip:
                    logits = logits.flip(-1)
                if vflip:
                    logits = logits.flip(-2)
                if logits.shape[-2:] != size:
                    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                probs = logits.softmax(1)
                total = probs if total is None else total + probs
                count += 1
        return total / count

    def predict(self, arrays: Mapping[str, np.ndarray], desc: str = "predict") -> np.ndarray:
        """Class probabilities (K, H, W) float32 on the primary modality's grid."""
        missing = [m for m in self.loaded.modalities if m not in arrays]
        if missing:
            raise ConfigError(f"the model needs modalities {self.loaded.modalities} but the input lacks {missing}; "
                              "give one file per modality.")
        for m, spec in self.loaded.specs.items():
            if arrays[m].shape[-3] != len(spec.bands):
                raise ConfigError(f"input {m} has {arrays[m].shape[-3]} bands but the model was trained on "
                                  f"{len(spec.bands)} ({', '.join(spec.bands)}); give those bands in that order.")
        primary = self.loaded.modalities[0]
        h, w = arrays[primary].shape[-2:]
        win = self.window
        ph, pw = max(h, win), max(w, win)
        padded = {}
        for m, spec in self.loaded.specs.items():
            a = arrays[m]
            th, tw = round(ph * spec.scale), round(pw * spec.scale)
            pad = [(0, 0)] * (a.ndim - 2) + [(0, th - a.shape[-2]), (0, tw - a.shape[-1])]
            fill = spec.nodata if spec.nodata is not None else 0
            padded[m] = np.pad(a, pad, mode="constant", constant_values=fill) if any(p[1] for p in pad[-2:]) else a
        k = len(self.loaded.classes)
        acc = np.zeros((k, ph, pw), np.float32)
        weight_sum = np.zeros((ph, pw), np.float32)
        wts = blend_weights(win)
        coords = [(y, x) for y in window_starts(ph, win, self.stride) for x in window_starts(pw, win, self.stride)]
        for i in tqdm(range(0, len(coords), self.batch_size), desc=desc, disable=not self.progress, leave=False):
            chunk = coords[i:i + self.batch_size]
            batch = {}
            for m, spec in self.loaded.specs.items():
                s = spec.scale
                ws = round(win * s)
                tiles = [padded[m][..., round(y * s):round(y * s) + ws, round(x * s):round(x * s) + ws]
                         for y, x in chunk]
                batch[m] = torch.from_numpy(np.ascontiguousarray(np.stack(tiles)))
            probs = self._forward(batch).cpu().numpy()
            for (y, x), p in zip(chunk, probs):
                acc[:, y:y + win, x:x + win] += p * wts
                weight_sum[y:y + win, x:x + win] += wts
        acc /= np.maximum(weight_sum, 1e-8)
        return acc[:, :h, :w]


def colourise(classes: np.ndarray, palette: Sequence[Sequence[int]], nodata_value: int | None = None) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB using the dataset palette (nodata black)."""
    lut = np.zeros((256, 3), np.uint8)
    for i, c in enumerate(palette):
        lut[i] = c
    if nodata_value is not None and nodata_value < 256:
        lut[nodata_value] = (0, 0, 0)
    return lut[classes.astype(np.uint8)]


def preview_rgb(array: np.ndarray, spec: ModalitySpec, stats: Mapping[str, Any] | None = None) -> np.ndarray:
    """A displayable (H, W, 3) uint8 image of a modality, stretched to its 2nd-98th percentiles."""
    a = np.asarray(array, np.float32)
    if a.ndim == 4:
        a = a[-1]
    a = a[:3] if a.shape[0] >= 3 else np.repeat(a[:1], 3, axis=0)
    out = np.zeros_like(a)
    for i in range(3):
        band = a[i]
        finite = band[np.isfinite(band)]
        lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        out[i] = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
    out = np.nan_to_num(out)
    return (out.transpose(1, 2, 0) * 255).astype(np.uint8)


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
