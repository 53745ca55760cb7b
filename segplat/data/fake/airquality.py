"""Fake data for the `airquality` layout: satellite chips, masks and air-quality companion grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from segplat.data.layouts.airquality import FOLDERS, companion_names


def write_fake(out: str | Path, num_train: int = 3, num_val: int = 2, image_size: int = 512, air_size: int = 64,
               bands_per_file: int = 12, seed: int = 0) -> Path:
    """A tiny airquality tree in the real formats: tiled GeoTIFFs with a projected CRS, uint16 images,
    uint8 masks coded 10 / 90, float32 companions. Urban pixels are brighter and raise NO2, so a model
    has something to learn from both streams."""
    from affine import Affine

    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("val", num_val)):
        folders = FOLDERS[split]
        for folder in folders.values():
            (out / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"SN10_CHN_{i + 1 + (0 if split == 'train' else 500):05d}_230409"
            yy, xx = np.mgrid[0:image_size, 0:image_size]
            cy, cx = rng.uniform(0.2, 0.8, 2) * image_size
            urban = ((yy - cy) ** 2 + (xx - cx) ** 2) < (rng.uniform(0.15, 0.3) * image_size) ** 2
            mask = np.where(urban, 10, 90).astype(np.uint8)
            image = rng.integers(300, 1500, (4, image_size, image_size)).astype(np.uint16)
            image[:3, urban] += 1500
            image[:, :2, :2] = 0  # a little no-data corner
            x0, y0 = 500_000.0 + 10 * image_size * i, 4_000_000.0
            transform = Affine(10.0, 0.0, x0, 0.0, -10.0, y0)
            common = {"driver": "GTiff", "crs": "EPSG:32650", "tiled": True, "blockxsize": 256 if image_size >= 256
                      else 16, "blockysize": 256 if image_size >= 256 else 16}
            with rasterio.open(out / folders["image"] / f"{stem}.tif", "w", height=image_size, width=image_size,
                               count=4, dtype="uint16", transform=transform, nodata=0, **common) as dst:
                dst.write(image)
            with rasterio.open(out / folders["mask"] / f"{stem}.tif", "w", height=image_size, width=image_size,
                               count=1, dtype="uint8", transform=transform, **common) as dst:
                dst.write(mask[None])
            f = image_size // air_size
            urban_coarse = urban.reshape(air_size, f, air_size, f).mean(axis=(1, 3))
            air_transform = Affine(10.0 * f, 0.0, x0, 0.0, -10.0 * f, y0)
            small = {**common, "blockxsize": 16, "blockysize": 16}
            for src, fname in companion_names(stem).items():
                grid = rng.normal(1.0, 0.1, (bands_per_file, air_size, air_size)).astype(np.float32)
                if src == "NO2":
                    grid += 2.0 * urban_coarse[None].astype(np.float32)
                folder = folders["gems"] if src == "GEMS" else folders["air"]
                with rasterio.open(out / folder / fname, "w", height=air_size, width=air_size,
                                   count=bands_per_file, dtype="float32", transform=air_transform, nodata=-9999.0,
                                   **small) as dst:
                    dst.write(grid)
    return out
