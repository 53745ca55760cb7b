"""Fake data for the `sen1floods11` layout: a tiny v1.1 HandLabeled tree with split CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rasterio.transform import from_origin

from segplat.data.fake.common import fake_scene
from segplat.data.layouts.sen1floods11 import SPLIT_FILES
from segplat.data.raster import write_geotiff


def write_fake(out_dir: str | Path, seed: int = 0, per_split: dict[str, int] | None = None,
               s2_dtype: str = "int16") -> Path:
    """A tiny v1.1 tree: 13-band int16 S2, float32 dB S1 with NaN nodata, int16 labels with -1, split CSVs.

    Water is dark in S1 (about -20 dB) and in S2 NIR/SWIR, so a model can learn it; one chip per
    split has a no-data strip (S1 NaN, S2 0, label -1), as real chips at swath edges do.
    """
    out = Path(out_dir)
    hand = out / "v1.1" / "data" / "flood_events" / "HandLabeled"
    split_dir = out / "v1.1" / "splits" / "flood_handlabeled"
    split_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = per_split or {"train": 12, "val": 4, "test": 2, "bolivia": 2}
    events = ["Ghana", "India", "Mekong", "Paraguay", "Spain", "USA"]
    k = 0
    for split, n in counts.items():
        rows = []
        for _ in range(n):
            event = "Bolivia" if split == "bolivia" else events[k % len(events)]
            chip = f"{event}_{100000 + 7919 * k}"
            h, w = int(rng.integers(60, 90)), int(rng.integers(70, 100))
            water = fake_scene(rng, h, w, 2)
            label = water.astype(np.int16)
            nodata = np.zeros((h, w), bool)
            if rng.random() < 0.5 or k == 0:
                nodata[:, : int(rng.integers(4, 12))] = True
            label[nodata] = -1
            vv = np.where(water == 1, -20.0, -8.0) + rng.normal(0, 1.0, (h, w))
            vh = vv - 7.0 + rng.normal(0, 0.8, (h, w))
            s1 = np.stack([vv, vh]).astype(np.float32)
            s1[:, nodata] = np.nan
            land = np.array([1500, 1300, 1200, 1100, 1500, 2300, 2600, 2800, 2900, 900, 30, 2100, 1500], np.float32)
            wet = np.array([1400, 1100, 900, 700, 600, 500, 450, 400, 380, 150, 10, 200, 120], np.float32)
            s2 = np.where(water[None] == 1, wet[:, None, None], land[:, None, None]) + rng.normal(0, 40, (13, h, w))
            s2 = np.clip(s2, 1, 20000).astype(s2_dtype)
            s2[:, nodata] = 0
            transform = from_origin(-63.0 + 0.01 * k, -14.0 + 0.01 * k, 8.983e-5, 8.983e-5)
            write_geotiff(hand / "S1Hand" / f"{chip}_S1Hand.tif", s1, "EPSG:4326", transform, nodata=float("nan"))
            write_geotiff(hand / "S2Hand" / f"{chip}_S2Hand.tif", s2, "EPSG:4326", transform, nodata=0)
            write_geotiff(hand / "LabelHand" / f"{chip}_LabelHand.tif", label[None], "EPSG:4326", transform)
            rows.append(f"{chip}_S1Hand.tif,{chip}_LabelHand.tif\n")
            k += 1
        (split_dir / f"{SPLIT_FILES[split]}.csv").write_text("".join(rows))
    return out
