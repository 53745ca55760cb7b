"""Raster helpers every reader of georeferenced files shares: reading with one-sentence errors, headers,
band selection, the grid check (CRS, transform, size) and warping onto a reference grid, georeferencing
as plain values, nodata normalisation, colour-label decoding and a GeoTIFF writer.

Layouts (`segplat.data.layouts.*`) and the fake-data writers (`segplat.data.fake.*`) import these; no
layout imports another layout for them.

The grid rule (docs/geodata.md): two rasters are paired pixel for pixel only when they lie on
the same grid: the same CRS, the same pixel size and orientation, origins less than
`GRID_TOLERANCE_PX` of a pixel apart and the same size. Anything else is refused naming both files
and how they differ, or, when the layout's `resample` is true, warped onto the reference grid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine, array_bounds
from rasterio.warp import Resampling, reproject

from segplat.errors import DataError
from segplat.messages import first_line

# origins may differ by this fraction of a pixel (and pixel sizes by this much over the raster's extent) and
# still count as one grid: float rounding in files written by different tools, never a real shift
GRID_TOLERANCE_PX = 0.01


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
    except (RasterioError, OSError) as err:
        raise DataError(f"{path}: cannot be {action} as a raster ({first_line(err)[:160]}); re-download or remove the "
                        "file.") from err


def _header(src: Any) -> dict[str, Any]:
    return {"height": src.height, "width": src.width, "count": src.count, "dtype": src.dtypes[0],
            "nodata": src.nodata, "crs": src.crs, "transform": src.transform, "res": src.res,
            "descriptions": tuple(src.descriptions)}


def raster_header(path: str | Path) -> dict[str, Any]:
    """Size, band count, dtype, nodata, CRS and transform without reading pixels."""
    with open_raster(path) as src:
        return _header(src)


def read_raster(path: str | Path, bands: Sequence[int | str] | None = None, key: str = "bands",
                names: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(C, H, W) pixels in the file's dtype plus its header; `bands` selects by 1-based index or description
    (see `select_bands`; `key` names the config key in errors); one-sentence DataError on any failure."""
    with open_raster(path, "read") as src:
        header = _header(src)
        return src.read(select_bands(bands, header, path, key, names)), header


def select_bands(select: Sequence[int | str] | None, header: Mapping[str, Any], path: str | Path, key: str,
                 names: Sequence[str] | None = None) -> list[int] | None:
    """1-based band indexes of the file for `select` (None: every band), checked against the file's band count.

    An int is a 1-based band index; a string is a band's description in the file (GDAL band description) or,
    failing that, its position in `names` (the dataset's documented band order, when the file has exactly
    that many bands).
    """
    if select is None:
        return None
    count = int(header["count"])
    described = [d for d in header.get("descriptions") or () if d]
    out = []
    for item in select:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise DataError(f"{key}={list(select)}: {item!r} is neither a 1-based band index nor a band name.")
        if isinstance(item, int):
            if not 1 <= item <= count:
                raise DataError(f"{path}: {key} asks for band {item} but the file has {count} band(s) (1-based "
                                f"indexes 1..{count}); fix {key} or the file.")
            out.append(item)
        elif item in described:
            out.append(list(header["descriptions"]).index(item) + 1)
        elif names is not None and item in names and count == len(names):
            out.append(list(names).index(item) + 1)  # the dataset's documented band order
        elif described:
            raise DataError(f"{path}: {key} asks for the band {item!r} but the file's bands are described as "
                            f"{', '.join(d or '-' for d in header['descriptions'])}; use one of these names or a "
                            "1-based index.")
        elif names is not None and item in names:
            raise DataError(f"{path}: has {count} band(s) without descriptions, so {key}={item!r} cannot be found by "
                            f"the documented order of {len(names)} ({', '.join(names)}); select by 1-based index.")
        else:
            known = f"the documented names are {', '.join(names)}" if names else "no names are documented"
            raise DataError(f"{path}: {key} asks for the band named {item!r} but the file's bands carry no "
                            f"descriptions and {known}; select by 1-based index.")
    return out


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


# -- grids --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Where a raster's pixels lie on the ground: CRS, affine transform (origin, pixel size) and size."""

    crs: CRS | None
    transform: Affine
    height: int
    width: int

    @classmethod
    def of(cls, header: Mapping[str, Any]) -> Grid:
        return cls(header.get("crs") or None, header["transform"], int(header["height"]), int(header["width"]))

    @property
    def georeferenced(self) -> bool:
        """False for plain images (no CRS and the identity transform GDAL reports for them)."""
        return bool(self.crs) or self.transform != Affine.identity()

    def scaled(self, factor: float, height: int, width: int) -> Grid:
        """The grid over the same origin with pixels `factor` times larger (a coarser grid nested in this one)."""
        return Grid(self.crs, self.transform @ Affine.scale(factor), height, width)

    def origin_str(self) -> str:
        return f"({self.transform.c:.10g}, {self.transform.f:.10g})"

    def describe(self) -> str:
        t = self.transform
        crs = _crs_str(self.crs) if self.crs else "no CRS"
        return f"{crs}, origin {self.origin_str()}, pixel {abs(t.a):g}x{abs(t.e):g}, {self.width}x{self.height} px"


def _crs_str(crs: CRS | None) -> str:
    if not crs:
        return "no CRS"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else (crs.to_string() or crs.to_wkt())[:60]


def grid_difference(grid: Grid, ref: Grid, tolerance_px: float = GRID_TOLERANCE_PX,
                    check_size: bool = True) -> str | None:
    """None when `grid` and `ref` are the same grid (see the module docstring); else how they differ, in words."""
    if grid.georeferenced != ref.georeferenced:
        which = "the first" if not grid.georeferenced else "the second"
        return f"{which} carries no georeferencing, so nothing shows that they cover the same ground"
    if not grid.georeferenced:
        if check_size and (grid.height, grid.width) != (ref.height, ref.width):
            return f"{grid.width}x{grid.height} px vs {ref.width}x{ref.height} px"
        return None
    if (grid.crs or None) != (ref.crs or None):
        return f"CRS {_crs_str(grid.crs)} vs {_crs_str(ref.crs)}"
    t, r = grid.transform, ref.transform
    extent = max(ref.height, ref.width, 1)
    # pixel size and orientation: the difference accumulated over the raster must stay under the tolerance
    for a, b in ((t.a, r.a), (t.b, r.b), (t.d, r.d), (t.e, r.e)):
        if abs(a - b) * extent > tolerance_px * max(abs(r.a), abs(r.e)):
            return f"pixel size {_px(t)} vs {_px(r)}"
    col, row = ~r @ (t.c, t.f)  # the grid's origin in the reference's pixel coordinates
    if abs(col) > tolerance_px or abs(row) > tolerance_px:
        return f"origin {grid.origin_str()} vs {ref.origin_str()}: {col:+.2f} px across, {row:+.2f} px down"
    if check_size and (grid.height, grid.width) != (ref.height, ref.width):
        return f"{grid.width}x{grid.height} px vs {ref.width}x{ref.height} px over the same origin"
    return None


def _px(t: Affine) -> str:
    """Pixel size as width x height; orientation only when it is not the usual north-up."""
    extra = f", rotation terms ({t.b:g}, {t.d:g})" if t.b or t.d else ""
    extra += " (south-up)" if t.e > 0 else ""
    return f"{abs(t.a):g}x{abs(t.e):g}{extra}"


def same_extent(grid: Grid, ref: Grid, tolerance_px: float = GRID_TOLERANCE_PX) -> bool:
    """The same CRS and the same bounds (to a fraction of `grid`'s pixel): the same ground, perhaps at another size."""
    if (grid.crs or None) != (ref.crs or None) or grid.transform.b or grid.transform.d:
        return False
    a = array_bounds(grid.height, grid.width, grid.transform)
    b = array_bounds(ref.height, ref.width, ref.transform)
    pixel = max(abs(grid.transform.a), abs(grid.transform.e))
    return all(abs(x - y) <= tolerance_px * pixel for x, y in zip(a, b))


def grid_relation(grid: Grid, path: str | Path, ref: Grid, ref_path: str | Path, resample: bool,
                  resample_key: str | None = "dataset.layout.resample", plain_ok: bool = False,
                  check_size: bool = True) -> str:
    """How `path` pairs with the reference `ref_path`: "same" (the same grid: pair pixel for pixel), "warp" (another
    grid, both georeferenced and `resample` asks to warp), "plain" (`plain_ok` and one of them carries no
    georeferencing: only sizes can be compared, which the caller does and reports); otherwise a one-sentence
    DataError naming both files and how their grids differ."""
    if plain_ok and not (grid.georeferenced and ref.georeferenced):
        return "plain"
    diff = grid_difference(grid, ref, check_size=check_size)
    if diff is None:
        return "same"
    both_geo = grid.georeferenced and ref.georeferenced
    if resample and both_geo:
        return "warp"
    if both_geo and resample_key:
        fix = f"set {resample_key}=true to warp the first onto the grid of the second, or fix the file"
    elif both_geo:
        fix = "warp the first onto the grid of the second (e.g. gdalwarp with its CRS, -te and -tr), or fix the file"
    else:
        fix = "georeference the file (the CRS and transform of the ground it shows) or fix its size"
    raise DataError(f"{path} and {ref_path} are not on the same grid ({diff}); {fix}.")


def read_on_grid(path: str | Path, ref: Grid, ref_path: str | Path, *, what: str, nodata: float | None,
                 resample: bool, resample_key: str = "dataset.layout.resample",
                 bands: Sequence[int | str] | None = None, bands_key: str = "bands", names: Sequence[str] | None = None,
                 resampling: Resampling = Resampling.bilinear, plain_ok: bool = False,
                 check_size: bool = True) -> tuple[np.ndarray, dict[str, Any], str]:
    """Read `path` (optionally some of its bands) onto the reference grid: (C, H, W) pixels, the header and the
    relation (see `grid_relation`; "warp" means the pixels returned are already warped).

    A warp that leaves `what` entirely no-data (the files do not overlap) and a partial cover that cannot be
    marked (integers without a nodata value) are one-sentence DataErrors, so no sample trains on a dead input."""
    data, header = read_raster(path, bands, bands_key, names)
    grid = Grid.of(header)
    relation = grid_relation(grid, path, ref, ref_path, resample, resample_key, plain_ok, check_size)
    if relation != "warp":
        return data, header, relation
    warped, covered = warp_to_grid(data, grid, ref, nodata, resampling)
    if not covered.any():
        raise DataError(f"{path}: {what} does not overlap {ref_path} ({grid.describe()} vs {ref.describe()}), so "
                        f"warped onto its grid every {what} pixel is no-data; the sample was skipped (pair files that "
                        "cover the same ground).")
    if not covered.all() and nodata is None and not np.issubdtype(warped.dtype, np.floating):
        raise DataError(f"{path}: {what} covers only part of {ref_path} and has no nodata value, so the pixels the "
                        "warp leaves uncovered cannot be marked as no-data; configure a nodata value the data never "
                        "takes.")
    return warped, header, relation


def warp_to_grid(data: np.ndarray, grid: Grid, ref: Grid, nodata: float | None,
                 resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """`data` (C, H, W) warped onto `ref` in its own dtype, and the (H', W') mask of reference pixels it covers.

    Source nodata never enters the interpolation; uncovered pixels get `nodata` (NaN for floats without one,
    0 for integers without one: the caller must then treat `covered` as the valid mask)."""
    if not grid.crs or not ref.crs:
        raise DataError("a raster without a CRS cannot be warped; georeference it.")
    out_dtype = data.dtype
    work = data.astype(np.float32) if resampling != Resampling.nearest and data.dtype != np.float64 else data
    is_float = np.issubdtype(work.dtype, np.floating)
    nan_nodata = nodata is not None and isinstance(nodata, float) and math.isnan(nodata)
    fill = nodata if nodata is not None else (np.nan if is_float else 0)
    dst = np.full((data.shape[0], ref.height, ref.width), fill, dtype=work.dtype)
    reproject(work, dst, src_transform=grid.transform, src_crs=grid.crs,
              src_nodata=None if nodata is None and not is_float else (np.nan if nan_nodata else nodata),
              dst_transform=ref.transform, dst_crs=ref.crs, dst_nodata=fill, resampling=resampling)
    cover = np.zeros((1, ref.height, ref.width), np.uint8)
    reproject(np.ones((1, grid.height, grid.width), np.uint8), cover, src_transform=grid.transform,
              src_crs=grid.crs, src_nodata=0, dst_transform=ref.transform, dst_crs=ref.crs, dst_nodata=0,
              resampling=Resampling.nearest)
    if np.issubdtype(out_dtype, np.integer) and work.dtype != out_dtype:
        info = np.iinfo(out_dtype)
        dst = np.clip(np.rint(np.nan_to_num(dst, nan=fill if fill is not None and not nan_nodata else 0)),
                      info.min, info.max)
    return dst.astype(out_dtype), cover[0].astype(bool)


def norm_nodata(value: Any) -> float | int | None:
    """None, NaN (also the string "nan"), or a number (int when whole, so integer stores compare exactly)."""
    if value is None:
        return None
    v = float(value)
    if math.isnan(v):
        return float("nan")
    return int(v) if v.is_integer() else v


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
                  nodata: float | None = None, descriptions: Sequence[str] | None = None) -> None:
    """A deflate GeoTIFF of (C, H, W) `data`, optionally with band descriptions (fake data and tests)."""
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
            for k, text in enumerate(descriptions or ()):
                dst.set_band_description(k + 1, text)
