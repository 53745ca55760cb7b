"""Fake data for the `s1s2_series` layout: a tiny PASTIS-R tree of .npy series and metadata.geojson."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np

from segplat.data.layouts.s1s2_series import VOID_CLASS

# the fake's crops (PASTIS-R class indices): meadow, soft winter wheat, corn, winter barley
CROPS = (1, 2, 3, 4)
# each crop's spectral offset per S2 band (x 300 reflectance units), so a model can tell them apart at once;
# their NDVI-like time profiles differ too
SIGNATURE = np.array([[0, 1, 0, -1, 1, 2, 2, 1, -1, 0], [1, 0, 1, 0, -1, 0, 1, 2, 1, 1],
                      [-1, -1, 0, 1, 2, 1, 0, -1, 2, 1], [2, 1, -1, 0, 0, -1, -1, 0, 0, 2],
                      [0, 0, 2, 1, 0, 1, 2, 0, -1, -1]], np.float32)  # row 0: background


def write_fake(out: str | Path, num_patches: int = 40, size: int = 32, s2_times: tuple[int, int] = (5, 8),
               s1_times: tuple[int, int] = (6, 9), seed: int = 0) -> Path:
    """A tiny PASTIS-R tree: int16 S2 and float32 S1A/S1D .npy stacks, TARGET .npy with void pixels,
    metadata.geojson (EPSG:2154, one 10 m footprint per patch) with folds 1-5 (40 patches: 24 train, 8 val,
    8 test with the default folds) and date dicts; one S2 date per patch is all no-data (a cloud-masked
    acquisition), so date dropping is exercised.
    Four crops in large parcels differ in their spectral signature and NDVI-like time profile, so a small
    model learns them within a few epochs."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for folder in ("DATA_S2", "DATA_S1A", "DATA_S1D", "ANNOTATIONS"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    feats = []
    base = dt.date(2018, 9, 15)
    for i in range(num_patches):
        pid = 10000 + i
        label = np.zeros((size, size), np.uint8)
        side = max(4, size * 3 // 8)
        for _ in range(3):
            y, x = rng.integers(0, size - side + 1, 2)
            label[y:y + side, x:x + side] = rng.choice(CROPS)
        label[:2, :] = VOID_CLASS
        kind = np.where(label == VOID_CLASS, 0, label).astype(np.int64)
        target = np.stack([label, label, np.zeros_like(label)]).astype(np.uint8)
        np.save(out / "ANNOTATIONS" / f"TARGET_{pid}.npy", target)
        props: dict[str, Any] = {"ID_PATCH": pid, "Fold": i % 5 + 1, "N_Parcel": 3, "TILE": "T31TFM"}
        for sensor, (lo, hi), bands in (("S2", s2_times, 10), ("S1A", s1_times, 3), ("S1D", s1_times, 3)):
            t = int(rng.integers(lo, hi + 1))
            days = np.sort(rng.choice(np.arange(0, 360, 5), t, replace=False))
            phase = kind.astype(np.float32)[None] / len(CROPS)
            prof = np.sin(days[:, None, None] / 60.0 + 3 * phase)  # (T, H, W)
            if sensor == "S2":
                spectral = 300 * SIGNATURE[kind].transpose(2, 0, 1)[None]  # (1, 10, H, W)
                arr = (1500 + 800 * prof[:, None] + spectral + rng.normal(0, 50, (t, bands, size, size)))
                arr = arr.astype(np.int16)
                arr[arr == 0] = 1
                arr[1] = 0  # all no-data date
            else:
                arr = (-12 + 3 * prof[:, None] + rng.normal(0, 0.5, (t, bands, size, size))).astype(np.float32)
            np.save(out / f"DATA_{sensor}" / f"{sensor}_{pid}.npy", arr)
            props[f"dates-{sensor}"] = {str(k): int((base + dt.timedelta(days=int(d))).strftime("%Y%m%d"))
                                        for k, d in enumerate(days)}
        # the patch footprint as PASTIS-R gives it: a square of 10 m pixels in Lambert-93, patches side by side
        west, north = 600_000 + (i % 8) * size * 10, 6_800_000 - (i // 8) * size * 10
        east, south = west + size * 10, north - size * 10
        feats.append({"type": "Feature", "properties": props, "geometry": {"type": "Polygon", "coordinates": [
            [[west, north], [east, north], [east, south], [west, south], [west, north]]]}})
    (out / "metadata.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::2154"}},
        "features": feats}))
    return out
