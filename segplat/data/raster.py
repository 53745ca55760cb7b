"""Raster helpers every reader of georeferenced files shares: reading with one-sentence errors, headers,
georeferencing as plain values, nodata normalisation, colour-label decoding and a GeoTIFF writer.

Layouts (`segplat.data.layouts.*`) and the fake-data writers (`segplat.data.fake.*`) import these; no
layout imports another layout for them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.transform import Affine

from segplat.errors import DataError


@contextmanager
def open_raster(path: str | Path, action: str = "opened") -> Iterator[Any]:
    """rasterio.open with the failures a user can cause turned into one-sentence DataErrors naming the file."""
    if not Path(path).is_file():
        raise DataError(f"{path}: the file is missing; restore it or remove the sample from the split.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                yield src
    except (RasterioIOError, OSError) as err:
        raise DataError(f"{path}: cannot be {action} as a raster ({_short(err)}); re-download or remove the file.") \
            from err


def _header(src: Any) -> dict[str, Any]:
    return {"height": src.height, "width": src.width, "count": src.count, "dtype": src.dtypes[0],
            "nodata": src.nodata, "crs": src.crs, "transform": src.transform, "res": src.res}


def raster_header(path: str | Path) -> dict[str, Any]:
    """Size, band count, dtype, nodata, CRS and transform without reading pixels."""
    with open_raster(path) as src:
        return _header(src)


def read_raster(path: str | Path, bands: Sequence[int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(C, H, W) pixels in the file's dtype plus its header; one-sentence DataError on any failure."""
    with open_raster(path, "read") as src:
        return src.read(list(bands) if bands is not None else None), _header(src)


def georef(header: Mapping[str, Any]) -> tuple[str | None, tuple[float, ...] | None]:
    """CRS as a string (EPSG code when there is one) and the 6 affine coefficients, or None when not georeferenced."""
    crs = header.get("crs")
    transform = header.get("transform")
    crs_s = None
    if crs:
        epsg = crs.to_epsg()
        crs_s = f"EPSG:{epsg}" if epsg else crs.to_wkt()
    if transform is None or (crs is None and transform == Affine.identity()):
        return crs_s, None
    return crs_s, tuple(float(v) for v in tuple(transform)[:6])


def norm_nodata(value: Any) -> float | int | None:
    """None, NaN (also the string "nan"), or a number (int when whole, so integer stores compare exactly)."""
    if value is None:
        return None
    v = float(value)
    if math.isnan(v):
        return float("nan")
    return int(v) if v.is_integer() else v


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__


def decode_colour_label(
    rgb: np.ndarray,
    palette: Sequence[Sequence[int]],
    source: str,
    ignore_colours: Sequence[Sequence[int]] = (),
    ignore_index: int = 255,
    tolerance: int = 0,
) -> tuple[np.ndarray, int]:
    """Colour-coded label (H, W, 3) RGB -> class indices (H, W) uint8 and the number of off-palette pixels mapped.

    Exact palette colours map directly (a 2^24 lookup table, linear time even on 6000x6000 tiles);
    an off-palette colour within `tolerance` (max abs difference per channel) of exactly one nearest
    palette colour is mapped to it and counted; anything else is refused, naming the colour.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"{source}: a colour label needs 3 channels but has shape {rgb.shape}; "
                        "check that this is the colour-coded label file.")
    rgb = rgb.astype(np.uint8, copy=False)
    codes = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    lut = np.full(1 << 24, 254, dtype=np.uint8)  # 254 = not yet decided
    targets: list[tuple[tuple[int, int, int], int]] = [(tuple(c), k) for k, c in enumerate(palette)]
    targets += [(tuple(c), ignore_index) for c in ignore_colours]
    for colour, value in targets:
        lut[(colour[0] << 16) | (colour[1] << 8) | colour[2]] = value
    label = lut[codes]
    unknown = label == 254
    if 254 in [v for _, v in targets]:
        raise DataError(f"{source}: class index 254 clashes with the decoder's marker; use fewer than 254 classes.")
    remapped = 0
    if unknown.any():
        colours = np.unique(codes[unknown])
        ref = np.array([c for c, _ in targets], dtype=np.int32)
        bad = []
        for code in colours:
            c = np.array([(code >> 16) & 255, (code >> 8) & 255, code & 255], dtype=np.int32)
            dist = np.abs(ref - c).max(axis=1)
            best = int(dist.argmin())
            if dist[best] <= tolerance and (dist == dist[best]).sum() == 1:
                lut[code] = targets[best][1]
            else:
                bad.append(tuple(int(v) for v in c))
        if bad:
            raise DataError(
                f"{source}: label colours {bad[:5]} (RGB) are not in the palette {[list(c) for c, _ in targets]} "
                f"(tolerance {tolerance}); fix the label file or the dataset's palette.")
        label = lut[codes]
        remapped = int(unknown.sum())
    return label, remapped


def write_geotiff(path: Path, data: np.ndarray, crs: str | None, transform: Affine | None,
                  nodata: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": data.shape[-2], "width": data.shape[-1], "count": data.shape[0],
               "dtype": str(data.dtype), "compress": "deflate"}
    if crs:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
