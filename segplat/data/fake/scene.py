"""A scene to predict, as a user would have one: one georeferenced GeoTIFF per modality of the synthetic dataset.

`python -m segplat.data.fake scene DIR` writes `DIR/scene_rgb.tif` (red, green, blue) and `DIR/scene_nir.tif` (nir),
uint8 with band descriptions, on one UTM grid, drawn like the built-in synthetic dataset's scenes (so a model trained
by `python -m segplat.train` predicts them), plus `DIR/scene_label.tif` (the classes, for a look at the answer).
"""

from __future__ import annotations

from pathlib import Path

from rasterio.transform import from_origin

from segplat.data.raster import write_geotiff
from segplat.data.synthetic import make_scene

CRS = "EPSG:32633"  # UTM 33N, 10 m pixels: what a Sentinel-2 tile is on
ORIGIN = (500_000.0, 5_400_000.0)


def write_fake(out_dir: str | Path, seed: int = 0, size: int = 512) -> Path:
    """Write the three GeoTIFFs of one `size` x `size` scene under `out_dir` and return the folder."""
    out = Path(out_dir)
    rgb, nir, label = make_scene(seed + 10_000, 0, size)  # a scene no training split holds
    transform = from_origin(*ORIGIN, 10.0, 10.0)
    write_geotiff(out / "scene_rgb.tif", rgb, CRS, transform, descriptions=("red", "green", "blue"))
    write_geotiff(out / "scene_nir.tif", nir, CRS, transform, descriptions=("nir",))
    write_geotiff(out / "scene_label.tif", label[None], CRS, transform, descriptions=("class",))
    return out
