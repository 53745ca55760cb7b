"""Fake data for the `geotiff` layout: projected GeoTIFFs as a user might have them (see write_fake)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from rasterio.warp import Resampling, reproject

from segplat.data.fake.common import fake_scene
from segplat.data.raster import write_geotiff

FAKE_CRS = "EPSG:32633"


def write_fake(out_dir: str | Path, seed: int = 0, per_split: int | None = None, sar_resolution: float = 10.0,
               sar_crs: str = FAKE_CRS) -> Path:
    """Projected GeoTIFFs as a user might have them: `{train,val}/{optical,sar,label}/scene_XX.tif`, 8 train and
    3 val scenes (or `per_split` of each).

    optical: uint16 red/green/blue/nir, nodata 0, with a no-data border; sar: float32 vv/vh, nodata NaN;
    label: uint8 classes 0 background, 1 water, 2 building, 255 outside the footprint. Sizes are
    non-square and not multiples of common tile sizes. `sar_resolution`/`sar_crs` make the SAR grid
    differ from the label grid, to exercise the refusal and `resample: true`.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in (("train", per_split or 8), ("val", per_split or 3)):
        for _ in range(n):
            h, w = int(rng.integers(70, 100)), int(rng.integers(90, 130))
            label = fake_scene(rng, h, w, 3)
            border = int(rng.integers(3, 9))
            footprint = np.zeros((h, w), bool)
            footprint[:, border:] = True  # the scene's swath starts a few columns in
            x0, y0 = 500_000 + 5_000 * k, 5_300_000 - 3_000 * k
            transform = from_origin(x0, y0, 10.0, 10.0)
            means = np.array([[900, 1100, 1000, 2600], [300, 400, 500, 150], [1800, 1700, 1600, 1900]], np.float32)
            opt = means[label].transpose(2, 0, 1) + rng.normal(0, 60, (4, h, w))
            opt = np.clip(opt, 1, 60000).astype(np.uint16)
            opt[:, ~footprint] = 0
            lab = np.where(footprint, label, 255).astype(np.uint8)
            name = f"scene_{k:02d}.tif"
            write_geotiff(out / split / "optical" / name, opt, FAKE_CRS, transform, nodata=0)
            write_geotiff(out / split / "label" / name, lab[None], FAKE_CRS, transform, nodata=255)
            sar_db = np.array([-9.0, -21.0, -4.0], np.float32)[label] + rng.normal(0, 0.8, (h, w)).astype(np.float32)
            sar = np.stack([sar_db, sar_db - 6.5]).astype(np.float32)
            sar[:, ~footprint] = np.nan
            if sar_resolution != 10.0 or sar_crs != FAKE_CRS:
                sar, sar_transform = _regrid(sar, transform, sar_resolution, sar_crs)
            else:
                sar_transform = transform
            write_geotiff(out / split / "sar" / name, sar, sar_crs, sar_transform, nodata=float("nan"))
            k += 1
    return out


def _regrid(data: np.ndarray, transform: Affine, resolution: float, crs: str) -> tuple[np.ndarray, Affine]:
    from rasterio.transform import array_bounds
    from rasterio.warp import calculate_default_transform

    h, w = data.shape[-2:]
    bounds = array_bounds(h, w, transform)
    dst_t, dw, dh = calculate_default_transform(FAKE_CRS, crs, w, h, *bounds,
                                                resolution=None if crs != FAKE_CRS else resolution)
    if crs == FAKE_CRS:
        dst_t, dw, dh = from_origin(bounds[0], bounds[3], resolution, resolution), \
            math.ceil((bounds[2] - bounds[0]) / resolution), math.ceil((bounds[3] - bounds[1]) / resolution)
    dst = np.full((data.shape[0], dh, dw), np.nan, np.float32)
    reproject(data, dst, src_transform=transform, src_crs=CRS.from_string(FAKE_CRS), src_nodata=np.nan,
              dst_transform=dst_t, dst_crs=CRS.from_string(crs), dst_nodata=np.nan, resampling=Resampling.bilinear)
    return dst, dst_t
