"""Scenes for prediction tests: real GeoTIFFs of two modalities on different grids, with nodata borders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from segplat.data.layouts.base import ModalitySpec
from segplat.data.synthetic import make_scene

SPECS = {"rgb": ModalitySpec(("red", "green", "blue"), nodata=0, dtype="uint16"),
         "coarse": ModalitySpec(("vv", "vh"), nodata=0, dtype="uint16", optical=False, scale=0.5)}
WINDOW = 64


def scene_arrays(height: int, width: int, seed: int = 1, border: int = 9) -> dict[str, np.ndarray]:
    """rgb at the label grid, coarse at half of it; nodata (0) borders at the top and the right in both."""
    rgb8, nir8, _ = make_scene(seed, 3, max(height, width) + 8)
    rgb = rgb8[:, :height, :width].astype(np.uint16) * 15 + 1
    ch, cw = round(height * 0.5), round(width * 0.5)
    coarse = np.stack([nir8[0, :2 * ch:2, :2 * cw:2], rgb8[1, :2 * ch:2, :2 * cw:2]]).astype(np.uint16) * 13 + 1
    rgb[:, :border] = 0
    rgb[:, :, width - border:] = 0
    coarse[:, :(border + 1) // 2] = 0
    coarse[:, :, cw - (border + 1) // 2:] = 0
    return {"rgb": rgb, "coarse": coarse}


def write_geotiffs(folder: Path, arrays: dict[str, np.ndarray], stem: str = "scene", by_folder: bool = False
                   ) -> dict[str, Path]:
    """One tiled GeoTIFF per modality (UTM, 10 m for the label grid): `folder/<stem>_<m>.tif`, or with
    `by_folder` `folder/<m>/<stem>.tif`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m, a in arrays.items():
        res = 10.0 / SPECS[m].scale
        p = folder / m / f"{stem}.tif" if by_folder else folder / f"{stem}_{m}.tif"
        p.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(p, "w", driver="GTiff", height=a.shape[1], width=a.shape[2], count=a.shape[0],
                           dtype=a.dtype, crs="EPSG:32632", transform=from_origin(600000.0, 5700000.0, res, res),
                           nodata=0, tiled=True, blockxsize=32, blockysize=32) as dst:
            dst.write(a)
        paths[m] = p
    return paths


def two_grid_checkpoint(path: Path) -> Path:
    """An untrained rgb + coarse (half resolution) checkpoint whose classes all win on parts of a scene."""
    from tests.inference.checkpoints import write_checkpoint

    return write_checkpoint(path, SPECS, calibrate=scene_arrays(128, 128, seed=7, border=0))
