"""airquality: 4-band satellite chips plus 48-channel air-quality grids (AI Hub dataSetSn=71805).

On-disk facts (docs/datasets.md): per split four folders, images `ts_sn/` (train) or
`vs_sn/` (val) as 512x512 4-band (R, G, B, NIR) 16-bit TIFs named like `SN10_CHN_00001_230409.tif`;
masks with the same name in `tl_sn/` / `vl_sn/`; companions found by stem: `GEMS_<stem>.tif` in
`t_gems/` / `v_gems/` and `AIR_Pollution_{CO,NO2,SO2}_<stem>.tif` in `t_ap/` / `v_ap/`, 12 channels
each, used at 64x64 (48 channels together).

Why two modalities: the air-quality grid is 8x coarser than the image. Upsampling it to 512x512
in the store would cost 64x the bytes and pretend to a resolution it does not have, so the store
keeps it at its own grid (`scale` = 64/512) and the model fuses the two (the Segmenter upsamples).

Public loaders disagree on the companions' band counts and the mask coding, so both are
configuration: `bands_per_file` (checked on every file; a mismatch names the file and the key)
and `mask_values` (mask value -> class index; other values raise or become the ignore index).
Companions that are not `air_size` pixels square are resampled to it, and the count is logged.

Grids (`segplat.data.raster`): when the files are georeferenced, the mask must lie on the image's grid
and each companion on the image grid coarsened by image_size / air_size (same CRS and origin); a
companion over the same extent at another size is resampled (counted), one over other ground is
refused naming both files, or warped onto the expected grid with `resample: true`. Files without
georeferencing are paired by size and counted in the prepare notes (the public sources do not say
whether the companions carry a CRS). `image_bands` / `air_bands` pick bands by name or 1-based index.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rasterio.enums import Resampling

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, band_names
from segplat.data.raster import (
    Grid,
    georef,
    grid_relation,
    open_raster,
    raster_header,
    read_on_grid,
    read_raster,
    same_extent,
    warp_to_grid,
)
from segplat.errors import ConfigError, DataError
from segplat.schema import PositiveInt

log = logging.getLogger(__name__)

FOLDERS = {
    "train": {"image": "ts_sn", "mask": "tl_sn", "air": "t_ap", "gems": "t_gems"},
    "val": {"image": "vs_sn", "mask": "vl_sn", "air": "v_ap", "gems": "v_gems"},
}
POLLUTANTS = ("CO", "NO2", "SO2")
IMAGE_BANDS = ("red", "green", "blue", "nir")
NAME_RE = re.compile(r"^[A-Z0-9]+_[A-Z]+_\d+_\d{6}$")  # sensor_country_id_YYMMDD, e.g. SN10_CHN_00001_230409
TIF_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")


def companion_names(stem: str) -> dict[str, str]:
    """The four companion files of an image stem, in channel order (GEMS first, then CO, NO2, SO2)."""
    return {"GEMS": f"GEMS_{stem}.tif", **{p: f"AIR_Pollution_{p}_{stem}.tif" for p in POLLUTANTS}}


class AirQualityLayout(Layout):
    """Reader of the airquality seed layout; modalities `image` (4 bands, label grid) and `air` (48 bands, 1/8)."""

    name = "airquality"
    classes = ("background", "industrial_urban")
    palette = ((0, 0, 0), (255, 64, 64))
    ignore_index = 255
    splits = ("train", "val")

    def __init__(self, root: str | None = None, mask_values: Mapping[int | str, int] | None = None,
                 unknown_mask_values: Literal["error", "ignore"] = "error", image_size: PositiveInt = 512,
                 air_size: PositiveInt = 64, bands_per_file: PositiveInt = 12, image_nodata: float | None = 0,
                 air_nodata: float | None = None, strict_names: bool = False,
                 image_bands: Sequence[str | PositiveInt] | None = None, air_bands: Sequence[PositiveInt] | None = None,
                 resample: bool = False) -> None:
        super().__init__(root)
        table = mask_values if mask_values is not None else {90: 0, 10: 1}
        try:
            self.mask_values = {int(k): int(v) for k, v in dict(table).items()}
        except (TypeError, ValueError) as err:
            raise ConfigError(f"dataset.layout.mask_values={dict(table)} must map integer mask values to class "
                              f"indices, e.g. {{90: 0, 10: 1}}.") from err
        bad = {k: v for k, v in self.mask_values.items()
               if not (0 <= v < len(self.classes) or v == self.ignore_index) or not 0 <= k <= 255}
        if bad:
            raise ConfigError(f"dataset.layout.mask_values has entries {bad} outside mask values 0..255 or classes "
                              f"0..{len(self.classes) - 1} (or {self.ignore_index} to ignore); fix the table.")
        self.unknown_mask_values = unknown_mask_values
        self.image_size, self.air_size = int(image_size), int(air_size)
        if self.image_size % self.air_size:
            raise ConfigError(f"dataset.layout.image_size={self.image_size} must be a positive multiple of "
                              f"dataset.layout.air_size={self.air_size} (the grids must nest exactly).")
        self.bands_per_file = int(bands_per_file)
        self.image_bands = band_names(image_bands, IMAGE_BANDS, "dataset.layout.image_bands", "an airquality image")
        per_file = tuple(str(b + 1) for b in range(self.bands_per_file))
        self.air_bands = tuple(int(b) for b in band_names(air_bands, per_file, "dataset.layout.air_bands",
                                                          "a companion file (bands_per_file)"))
        self.resample = bool(resample)
        self.plain_pairs = 0  # files without georeferencing, paired by size
        self.image_nodata = image_nodata
        self.air_nodata = air_nodata
        self.strict_names = strict_names
        self.resampled = 0  # companions read at another size than air_size (logged)
        self._lut = self._mask_lut()

    @property
    def notes(self) -> list[str]:
        """What prepare should record beside the skips (StoreWriter copies these into the store attrs)."""
        out = []
        if self.resampled:
            out.append(f"{self.resampled} companion TIF(s) were not {self.air_size}x{self.air_size} and were "
                       "resampled to it")
        if self.plain_pairs:
            out.append(f"{self.plain_pairs} mask/companion file(s) carry no georeferencing (or their image does not) "
                       "and were paired with their image by size")
        return out

    # -- constants ------------------------------------------------------------------------------
    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        air_bands = tuple(f"{src}_{b:02d}" for src in ("GEMS", *POLLUTANTS) for b in self.air_bands)
        return {
            "image": ModalitySpec(bands=self.image_bands, nodata=self.image_nodata, dtype="uint16", optical=True),
            "air": ModalitySpec(bands=air_bands, nodata=float("nan"), dtype="float32", optical=False,
                                scale=self.air_size / self.image_size),
        }

    def fingerprint_params(self) -> dict[str, Any]:
        return {**super().fingerprint_params(), "mask_values": sorted(self.mask_values.items()),
                "unknown": self.unknown_mask_values, "image_size": self.image_size, "air_size": self.air_size,
                "bands_per_file": self.bands_per_file, "image_nodata": self.image_nodata,
                "air_nodata": self.air_nodata, "image_bands": list(self.image_bands), "air_bands": list(self.air_bands),
                "resample": self.resample, "version": 2}

    def _mask_lut(self) -> np.ndarray:
        """256-entry table mask value -> class; unmapped values get a sentinel (error) or the ignore index."""
        fill = 256 if self.unknown_mask_values == "error" else self.ignore_index
        lut = np.full(257, fill, dtype=np.int32)
        for value, cls in self.mask_values.items():
            lut[value] = cls
        return lut

    # -- scan -----------------------------------------------------------------------------------
    def scan(self) -> dict[str, list[SampleRef]]:
        if self.root is None:
            raise ConfigError("dataset.root is not set; point it at the folder holding ts_sn/ tl_sn/ t_ap/ t_gems/.")
        root = Path(self.root)
        out: dict[str, list[SampleRef]] = {}
        for split, folders in FOLDERS.items():
            present = {k: (root / v).is_dir() for k, v in folders.items()}
            if not any(present.values()):
                continue
            missing = [folders[k] for k, ok in present.items() if not ok]
            if missing:
                raise DataError(f"{root}: the {split} split has {', '.join(folders[k] for k in present if present[k])}"
                                f" but lacks {', '.join(missing)}; restore the missing folders.")
            refs = []
            for img in sorted(p for p in (root / folders["image"]).iterdir() if p.suffix in TIF_SUFFIXES):
                stem = img.stem
                if self.strict_names and not NAME_RE.match(stem):
                    raise DataError(f"{img}: the name does not follow SENSOR_COUNTRY_ID_YYMMDD.tif (e.g. "
                                    "SN10_CHN_00001_230409.tif); rename it or set dataset.layout.strict_names=false.")
                files = {"image": str(img), "mask": str(self._find(root / folders["mask"], stem))}
                for src, fname in companion_names(stem).items():
                    folder = folders["gems"] if src == "GEMS" else folders["air"]
                    files[src] = str(root / folder / fname)
                refs.append(SampleRef(f"{split}/{stem}", files))
            out[split] = refs
        if not out:
            raise DataError(f"{root} holds none of ts_sn/ tl_sn/ t_ap/ t_gems/ (train) or vs_sn/ vl_sn/ v_ap/ v_gems/"
                            " (val); point dataset.root at the airquality folder.")
        return out

    @staticmethod
    def _find(folder: Path, stem: str) -> Path:
        for suffix in TIF_SUFFIXES:
            p = folder / f"{stem}{suffix}"
            if p.is_file():
                return p
        return folder / f"{stem}.tif"

    # -- read -----------------------------------------------------------------------------------
    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        return self.image_size, self.image_size

    def read(self, ref: SampleRef) -> Sample:
        files = ref.files
        for key, path in files.items():
            if not Path(path).is_file():
                raise DataError(f"{path}: the {key} file of sample {ref.id} is missing; restore it or remove the "
                                "sample's other files.")
        image, header = self._read_image(files["image"])
        grid = Grid.of(header)
        label = self._read_mask(files["mask"], grid, files["image"])
        air = np.concatenate([self._read_air(files[src], grid, files["image"]) for src in ("GEMS", *POLLUTANTS)],
                             axis=0)
        crs, transform = georef(header)
        return Sample(arrays={"image": image, "air": air}, label=label, source=files["image"], crs=crs,
                      transform=transform)

    def _read_image(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        header = raster_header(path)
        if header["count"] != len(IMAGE_BANDS) and self.image_bands == IMAGE_BANDS:
            raise DataError(f"{path}: the image has {header['count']} bands but airquality images have 4 "
                            "(R, G, B, NIR); check the file or pick bands with dataset.layout.image_bands.")
        if (header["height"], header["width"]) != (self.image_size, self.image_size):
            raise DataError(f"{path}: the image is {header['width']}x{header['height']} but dataset.layout.image_size="
                            f"{self.image_size}; set image_size to the chips' size.")
        bands = None if self.image_bands == IMAGE_BANDS else self.image_bands
        arr, header = read_raster(path, bands, "dataset.layout.image_bands", IMAGE_BANDS)
        if arr.dtype != np.uint16:
            if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 65535:
                raise DataError(f"{path}: the image is {arr.dtype} with values outside 0..65535; airquality images "
                                "are 16-bit unsigned.")
            arr = arr.astype(np.uint16)
        return arr, header

    def _read_mask(self, path: str, image: Grid, image_path: str) -> np.ndarray:
        raw, header = read_raster(path, [1])
        grid = Grid.of(header)
        relation = grid_relation(grid, path, image, image_path, self.resample, plain_ok=True, check_size=False)
        self.plain_pairs += relation == "plain"
        raw = raw[0]
        if relation != "warp" and raw.shape != (image.height, image.width):
            raise DataError(f"{path}: the mask is {raw.shape[1]}x{raw.shape[0]} but its image is "
                            f"{image.width}x{image.height}; the mask does not belong to the image.")
        if raw.min() < 0 or raw.max() > 255:
            raise DataError(f"{path}: mask values {int(raw.min())}..{int(raw.max())} are outside 0..255; "
                            "check the file.")
        label = self._lut[raw.astype(np.int32)]
        if (label == 256).any():
            values = sorted(int(v) for v in np.unique(raw[label == 256]))[:8]
            raise DataError(f"{path}: mask values {values} are not in dataset.layout.mask_values "
                            f"{self.mask_values}; add them to the table or set "
                            "dataset.layout.unknown_mask_values=ignore.")
        label = label.astype(np.uint8)
        if relation == "warp":  # classes by nearest neighbour; where the mask does not reach: ignored
            warped, covered = warp_to_grid(label[None], grid, image, self.ignore_index, Resampling.nearest)
            label = np.where(covered, warped[0], self.ignore_index).astype(np.uint8)
        return label

    def _read_air(self, path: str, image: Grid, image_path: str) -> np.ndarray:
        """One companion's (selected) bands on the air grid: the image grid coarsened by image_size / air_size."""
        header = raster_header(path)
        if header["count"] != self.bands_per_file:
            raise DataError(f"{path}: has {header['count']} bands but dataset.layout.bands_per_file="
                            f"{self.bands_per_file} (public loaders disagree on this count); set bands_per_file "
                            f"to {header['count']} if every companion file has {header['count']} bands.")
        nodata = self.air_nodata if self.air_nodata is not None else header["nodata"]
        grid = Grid.of(header)
        expected = image.scaled(self.image_size / self.air_size, self.air_size, self.air_size)
        size = (grid.height, grid.width)
        if grid.georeferenced and image.georeferenced and size != (self.air_size, self.air_size) \
                and same_extent(grid, expected):
            relation = "resize"  # the same ground at another resolution
        else:
            relation = grid_relation(grid, path, expected, f"the {self.air_size}x{self.air_size} grid over "
                                     f"{image_path}", self.resample, plain_ok=True)
            self.plain_pairs += relation == "plain"
        if relation == "warp":
            arr, _, _ = read_on_grid(path, expected, image_path, what="air", nodata=nodata, resample=True,
                                     bands=list(self.air_bands))
            arr = arr.astype(np.float32)
        elif size == (self.air_size, self.air_size):
            arr = read_raster(path, list(self.air_bands))[0].astype(np.float32)
        else:
            arr = self._resized(path, size)
        if nodata is not None and not np.isnan(nodata):
            arr[arr == np.float32(nodata)] = np.nan
        return arr

    def _resized(self, path: str, size: tuple[int, int]) -> np.ndarray:
        """A companion over the image's extent at another size, resampled to air_size (averaged when coarser)."""
        with open_raster(path, "read") as src:
            arr = src.read(list(self.air_bands), out_shape=(len(self.air_bands), self.air_size, self.air_size),
                           out_dtype="float32",
                           resampling=Resampling.average if size[0] > self.air_size else Resampling.bilinear)
        self.resampled += 1
        if self.resampled == 1 or self.resampled % 100 == 0:
            log.warning("airquality: %s is %dx%d, resampled to %dx%d (%d file(s) so far)", path, size[0], size[1],
                        self.air_size, self.air_size, self.resampled)
        return arr
