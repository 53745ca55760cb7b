"""Inference building blocks: a model and its preprocessing from a checkpoint alone, the batch forward that
validation, evaluation and prediction share, and sliding-window prediction over scenes of any size (overlap,
weighted blending, TTA) with memory bounded by the window, the batch and the scene's width.

A checkpoint carries its resolved config and the data facts (classes, palette, band names,
normalisation statistics), so prediction needs neither the run folder nor the training data. The
stored config is untrusted: only its checked `model` and `dataset` parts are ever built
(`segplat.engine.checkpoint.inference_config`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from segplat.data.layouts.base import ModalitySpec
from segplat.data.preprocess import Preprocessor
from segplat.data.windows import check_grid_alignment, grid_alignment, window_starts
from segplat.engine.checkpoint import (
    DataFacts,
    check_belongs_to_run,
    find_checkpoint,
    inference_config,
    load_checkpoint,
)
from segplat.engine.forward import TTAView, forward_batch
from segplat.errors import CheckpointError, ConfigError, DataError
from segplat.models.build import build_model
from segplat.schema import OpenFraction, PositiveFloat, PositiveInt


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
                       prefer: str = "best.ckpt", searchpath: Sequence[str | Path] | None = None) -> LoadedModel:
    """Build the model of a run from a run folder or a .ckpt (best checkpoint preferred).

    `config` of the result holds only the checkpoint's checked `model` and `dataset` parts. `searchpath`: the
    user's config folders whose targets may be built (None: those the running Hydra command was given).
    """
    from segplat.utils.searchpath import command_searchpath

    searchpath = command_searchpath() if searchpath is None else searchpath
    path = find_checkpoint(location, prefer=prefer)
    state = load_checkpoint(path)
    if not state.get("config"):
        raise CheckpointError(f"checkpoint {path} carries no config (written by an older segplat); predict from a "
                              "run trained with this version.")
    cfg = inference_config(state, path, searchpath)
    data = DataFacts.from_state(state.get("data"), path)
    check_belongs_to_run(location, path, cfg)
    specs = data.specs
    modalities = {m: len(s.bands) for m, s in specs.items()}
    model = build_model(cfg.model, modalities, len(data.classes), {m: s.bands for m, s in specs.items()})
    model.load_state_dict(state["model"])
    model.eval().to(device)
    pre = Preprocessor(specs, data.stats, list(specs))
    return LoadedModel(model, pre, specs, list(data.classes), [list(c) for c in data.palette], data.ignore_index,
                       data.patch_size, cfg, path)


# -- window geometry -------------------------------------------------------------------------------------
def blend_weights(size: int, kind: str = "cosine") -> np.ndarray:
    """Window weights that fall towards the borders, so overlapping windows blend without seams."""
    if kind == "uniform":
        return np.ones((size, size), np.float32)
    ramp = 0.5 * (1 - np.cos(2 * np.pi * (np.arange(size) + 0.5) / size))
    w = np.outer(ramp, ramp).astype(np.float32)
    return np.maximum(w, 1e-3)


@dataclass(frozen=True)
class WindowGrid:
    """Where the windows of one scene go, on the label grid (the primary modality's grid)."""

    height: int
    width: int
    padded_height: int  # the scene padded up to a multiple of the alignment and at least one window
    padded_width: int
    rows: list[int]
    cols: list[int]

    @property
    def num_windows(self) -> int:
        return len(self.rows) * len(self.cols)

    def coords(self) -> list[tuple[int, int]]:
        """Window starts in row-major order: the order windows are predicted and blended."""
        return [(y, x) for y in self.rows for x in self.cols]


# -- window sources ----------------------------------------------------------------------------------------
class WindowSource(Protocol):
    """One modality of a scene, read window by window on its own grid (a raster file, or an array in memory)."""

    shape: tuple[int, ...]  # (..., C, H, W)
    dtype: np.dtype

    def read(self, row: int, col: int, height: int, width: int, fill: float) -> np.ndarray:
        """(..., C, height, width) from (row, col) on; pixels outside the source are `fill`."""


def read_filled(shape: Sequence[int], dtype: Any, row: int, col: int, height: int, width: int, fill: float,
                read: Callable[[int, int, int, int], np.ndarray]) -> np.ndarray:
    """A window that may reach past the source: `read(r0, r1, c0, c1)` fetches the part inside, the rest is `fill`."""
    h, w = shape[-2:]
    r0, r1, c0, c1 = max(row, 0), min(row + height, h), max(col, 0), min(col + width, w)
    if (r0, r1, c0, c1) == (row, row + height, col, col + width):
        return np.asarray(read(r0, r1, c0, c1))
    out = np.full((*shape[:-2], height, width), fill, dtype)
    if r1 > r0 and c1 > c0:
        out[..., r0 - row:r1 - row, c0 - col:c1 - col] = read(r0, r1, c0, c1)
    return out


class ArraySource:
    """A modality already in memory (a dataset layout's sample, a notebook's array)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def read(self, row: int, col: int, height: int, width: int, fill: float) -> np.ndarray:
        return read_filled(self.shape, self.dtype, row, col, height, width, fill,
                           lambda r0, r1, c0, c1: self.array[..., r0:r1, c0:c1])


def fill_value(spec: ModalitySpec, dtype: Any) -> float:
    """What pads a window past the scene: the modality's nodata (so the model sees no data there), else 0."""
    if spec.nodata is None or (isinstance(spec.nodata, float) and math.isnan(spec.nodata)
                               and not np.issubdtype(np.dtype(dtype), np.floating)):
        return 0
    return spec.nodata


def scene_size(loaded: LoadedModel, shapes: Mapping[str, Sequence[int]], names: Mapping[str, str] | None = None
               ) -> tuple[int, int]:
    """A scene's (height, width) on the label grid, after checking each modality's band count and size against
    the model (`shapes`: (..., C, H, W) per modality; `names`: what each was read from, for the messages)."""
    missing = [m for m in loaded.modalities if m not in shapes]
    if missing:
        raise ConfigError(f"the model needs modalities {loaded.modalities} but the input lacks {missing}; "
                          "give one file per modality.")
    names = names or {m: m for m in shapes}
    for m, spec in loaded.specs.items():
        if shapes[m][-3] != len(spec.bands):
            dataset = OmegaConf.select(loaded.config, "dataset.name", default=None)
            layout = (f" (files in the {dataset} dataset's own layout, e.g. an image holding more than {m}, are read "
                      f"as in training with input=<the dataset's root> split=...)" if dataset else "")
            raise ConfigError(f"input {names[m]} has {shapes[m][-3]} bands but the model was trained on "
                              f"{len(spec.bands)} for {m} ({', '.join(spec.bands)}); give those bands in that "
                              f"order{layout}.")
    primary = loaded.modalities[0]
    scale = loaded.specs[primary].scale
    height, width = round(shapes[primary][-2] / scale), round(shapes[primary][-1] / scale)
    for m, spec in loaded.specs.items():
        want = (round(height * spec.scale), round(width * spec.scale))
        have = tuple(shapes[m][-2:])
        if have != want:
            raise DataError(f"{names[m]} is {have[1]}x{have[0]} pixels but the model expects {want[1]}x{want[0]} "
                            f"for {m} next to {names[primary]}; resample it to the trained grid.")
    return height, width


# -- the sliding-window predictor ---------------------------------------------------------------------------
EMIT_ROWS = 64  # rows per band handed out by `SlidingWindowPredictor.stream`
@dataclass
class RowBand:
    """Finished rows of a scene: nothing later changes them."""

    row: int  # the first row, on the label grid
    probs: np.ndarray  # (K, n, W) float32 class probabilities
    valid: np.ndarray  # (n, W) bool: some modality has data here


def _ring(start: int, length: int, size: int) -> list[tuple[slice, slice]]:
    """(ring rows, local rows) pairs that map rows start..start+length onto a ring buffer of `size` rows."""
    first = start % size
    if first + length <= size:
        return [(slice(first, first + length), slice(0, length))]
    head = size - first
    return [(slice(first, size), slice(0, head)), (slice(0, length - head), slice(head, length))]


# one window is one model input; beyond this a window's blend weights and logits alone need gigabytes
MAX_WINDOW = 8192


class SlidingWindowPredictor:
    """Class probabilities of scenes of any size, window by window, with bounded memory.

    Windows (`window` label pixels, `overlap` of their size shared with neighbours) are read from each
    modality on its own grid, predicted `batch_size` at a time, weighted by `blend_weights` and summed into a
    ring of `window` rows as wide as the scene: once the windows move down past a row, the row is final and is
    handed out (`stream`). Peak memory is therefore the batch plus one window-high band of the scene's width,
    whatever the scene's height; `predict` collects the bands of an in-memory scene.
    """

    def __init__(self, loaded: LoadedModel, window: PositiveInt | None = None, overlap: OpenFraction = 0.25,
                 batch_size: PositiveInt = 4, flips: bool = False, scales: Sequence[PositiveFloat] = (1.0,),
                 device: str | torch.device = "cpu", bf16: bool | None = None, progress: bool = True) -> None:
        """Each argument's range is its type (the predict task's keys are checked against the same types); what
        is checked here is the window against the model: its size in memory and on every modality's grid."""
        self.loaded = loaded
        self.window = int(window or loaded.patch_size)
        if self.window > MAX_WINDOW:
            per_window = self.window ** 2 * (len(loaded.classes) + 2) * 4 / 2**30
            raise ConfigError(f"window={self.window} is larger than {MAX_WINDOW} px: one window's weights and logits "
                              f"alone would take {per_window:.1f} GiB; scenes of any size are tiled, so use a window "
                              f"near the training patch size ({loaded.patch_size}).")
        scales_of = {m: s.scale for m, s in loaded.specs.items()}
        check_grid_alignment(self.window, scales_of, "window")
        self.align = grid_alignment(scales_of.values())
        stride = round(self.window * (1 - overlap))
        self.stride = max(self.align, stride - stride % self.align)
        self.batch_size = int(batch_size)
        if any(float(s) != 1.0 for s in scales) and any(s.temporal for s in loaded.specs.values()):
            raise ConfigError("tta.scales other than 1.0 cannot resize the time series this model takes; use "
                              "tta.scales=[1.0].")
        self.views: list[TTAView] = [(float(s), h, v) for s in scales
                                     for h, v in ([(False, False), (True, False), (False, True)] if flips
                                                  else [(False, False)])]
        self.device = torch.device(device)
        self.bf16 = (self.device.type == "cuda") if bf16 is None else bool(bf16)
        self.progress = progress
        self.weights = blend_weights(self.window)

    # -- geometry ------------------------------------------------------------------------------------------
    def check_shapes(self, shapes: Mapping[str, Sequence[int]], names: Mapping[str, str] | None = None
                     ) -> tuple[int, int]:
        return scene_size(self.loaded, shapes, names)

    def grid(self, height: int, width: int) -> WindowGrid:
        """The windows of a height x width scene (label grid): every start a multiple of the alignment."""
        def padded(n: int) -> int:
            n = max(n, self.window)
            return -(-n // self.align) * self.align

        ph, pw = padded(height), padded(width)
        return WindowGrid(height, width, ph, pw, window_starts(ph, self.window, self.stride),
                          window_starts(pw, self.window, self.stride))

    # -- model -----------------------------------------------------------------------------------------------
    def window_probs(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """(B, K, window, window) float32 probabilities of a batch of windows in native dtypes."""
        def autocast() -> AbstractContextManager:
            return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        logits = forward_batch(self.loaded.model, self.loaded.preprocessor, tensors, self.device, autocast,
                               self.views)
        return logits.softmax(1).cpu().numpy()

    def read_windows(self, sources: Mapping[str, WindowSource], coords: Sequence[tuple[int, int]]
                     ) -> dict[str, np.ndarray]:
        """The windows at `coords` (label grid) of every modality, each on its own grid, stacked."""
        batch = {}
        for m, spec in self.loaded.specs.items():
            s, src = spec.scale, sources[m]
            size = round(self.window * s)
            fill = fill_value(spec, src.dtype)
            batch[m] = np.stack([src.read(round(y * s), round(x * s), size, size, fill) for y, x in coords])
        return batch

    def window_valid(self, batch: Mapping[str, np.ndarray], nodata: Mapping[str, float | None]) -> np.ndarray:
        """(B, window, window) True where some modality has data (the nodata rule of the store)."""
        from segplat.data.store import _nodata_mask, _resize_nearest_mask

        n = next(iter(batch.values())).shape[0]
        empty = np.ones((n, self.window, self.window), bool)
        for m, a in batch.items():
            for i in range(n):
                empty[i] &= _resize_nearest_mask(_nodata_mask(a[i], nodata[m]), (self.window, self.window))
        return ~empty

    # -- streaming -------------------------------------------------------------------------------------------
    def stream(self, sources: Mapping[str, WindowSource], nodata: Mapping[str, float | None] | None = None,
               desc: str = "predict", names: Mapping[str, str] | None = None,
               observe: Callable[[Sequence[tuple[int, int]], Mapping[str, np.ndarray]], None] | None = None
               ) -> Iterator[RowBand]:
        """Finished rows of the scene, top to bottom, as the windows pass them.

        `nodata`: per modality, the value that marks missing data for the output's nodata mask (a file's own
        tag); modalities not named use the trained nodata. `observe(coords, batch)` sees every batch of windows
        as read (label-grid starts, arrays per modality), e.g. to sample a preview without reading the scene twice.
        """
        height, width = self.check_shapes({m: s.shape for m, s in sources.items()}, names)
        grid = self.grid(height, width)
        nodata = {m: (nodata or {}).get(m, spec.nodata) for m, spec in self.loaded.specs.items()}
        win, k = self.window, len(self.loaded.classes)
        acc = np.zeros((k, win, grid.padded_width), np.float32)
        weight = np.zeros((win, grid.padded_width), np.float32)
        valid = np.zeros((win, grid.padded_width), bool)
        coords = grid.coords()
        top = 0
        with tqdm(total=len(coords), desc=desc, unit="win", disable=not self.progress, leave=False) as bar:
            for i in range(0, len(coords), self.batch_size):
                chunk = coords[i:i + self.batch_size]
                batch = self.read_windows(sources, chunk)
                if observe is not None:
                    observe(chunk, batch)
                probs = self.window_probs(batch)
                masks = self.window_valid(batch, nodata)
                for (y, x), p, v in zip(chunk, probs, masks):
                    if y != top:  # the windows moved down: rows above y are final
                        yield from self._finish(acc, weight, valid, top, y, grid)
                        top = y
                    cols = slice(x, x + win)
                    for ring, local in _ring(y, win, win):
                        acc[:, ring, cols] += p[:, local] * self.weights[local]
                        weight[ring, cols] += self.weights[local]
                        valid[ring, cols] |= v[local]
                bar.update(len(chunk))
        yield from self._finish(acc, weight, valid, top, top + win, grid)

    @staticmethod
    def _finish(acc: np.ndarray, weight: np.ndarray, valid: np.ndarray, start: int, stop: int,
                grid: WindowGrid) -> Iterator[RowBand]:
        """Hand out rows start..stop of the ring (the part inside the scene) and clear them for the rows to come.

        In bands of at most EMIT_ROWS rows, so that the float32 copy handed out stays small beside the ring."""
        keep = max(0, min(stop, grid.height) - start)
        parts = _ring(start, stop - start, acc.shape[1])
        rows = np.concatenate([np.arange(r.start, r.stop) for r, _ in parts])[:keep]
        for i in range(0, keep, EMIT_ROWS):
            part = rows[i:i + EMIT_ROWS]
            probs = acc[:, part, :grid.width] / np.maximum(weight[part, :grid.width], 1e-8)
            yield RowBand(start + i, probs, valid[part, :grid.width].copy())
        for ring, _ in parts:
            acc[:, ring] = 0
            weight[ring] = 0
            valid[ring] = False

    def predict(self, arrays: Mapping[str, np.ndarray], desc: str = "predict") -> np.ndarray:
        """Class probabilities (K, H, W) float32 of a scene in memory, on the label grid."""
        sources = {m: ArraySource(a) for m, a in arrays.items()}
        bands = list(self.stream(sources, desc=desc))
        return np.concatenate([b.probs for b in bands], axis=1)


# -- pictures ----------------------------------------------------------------------------------------------
def colourise(classes: np.ndarray, palette: Sequence[Sequence[int]], nodata_value: int | None = None) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB using the dataset palette (nodata black)."""
    lut = np.zeros((256, 3), np.uint8)
    for i, c in enumerate(palette):
        lut[i] = c
    if nodata_value is not None and nodata_value < 256:
        lut[nodata_value] = (0, 0, 0)
    return lut[classes.astype(np.uint8)]


def add_legend(image: np.ndarray, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> np.ndarray:
    """`image` (H, W, 3 RGB or 4 RGBA, uint8) above a white strip naming each class beside a swatch of its colour,
    wrapped to the image's width: a picture in a dataset's palette says nothing without it."""
    import cv2

    h, w, channels = image.shape
    width = max(w, 240)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, float(np.clip(width / 1000, 0.4, 1.2))
    thickness = 1 if scale < 0.8 else 2
    (_, text_h), baseline = cv2.getTextSize("Ag", font, scale, thickness)
    swatch = text_h + baseline
    pad = max(4, swatch // 2)
    places, x, y = [], pad, pad
    for name in classes:
        text_w = cv2.getTextSize(name, font, scale, thickness)[0][0]
        entry = swatch + pad // 2 + text_w + 2 * pad
        if x > pad and x + entry > width:
            x, y = pad, y + swatch + pad
        places.append((x, y, name))
        x += entry
    strip = np.full((y + swatch + pad, width, 3), 255, np.uint8)
    for (x, y, name), colour in zip(places, palette):
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), tuple(int(c) for c in colour), -1)
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), (96, 96, 96), 1)
        cv2.putText(strip, name, (x + swatch + pad // 2, y + text_h), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    if channels == 4:  # the legend is opaque
        strip = np.dstack([strip, np.full(strip.shape[:2], 255, np.uint8)])
    out = np.full((h + strip.shape[0], width, channels), 255, np.uint8)
    out[:h, :w] = image
    out[h:] = strip
    return out


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
