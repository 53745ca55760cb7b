"""Writing a scene's outputs: striped GeoTIFFs under `.partial/` turned into COGs, probability rasters, previews,
the scene's STAC Item."""


from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import cv2
import numpy as np
from omegaconf import DictConfig

from segplat.errors import DataError
from segplat.inference import (
    LoadedModel,
    RowBand,
    add_legend,
    colourise,
    overlay,
    preview_rgb,
)
from segplat.predict import class_table, stac
from segplat.utils.io import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger("segplat")
NODATA_CLASS = 255
# probabilities=uint8 stores round(p * 254); 255 is nodata; the band's GDAL scale 1/254 gives p back
UINT8_PROBABILITY_SCALE = 254
PARTIAL = ".partial"
STREAM_STRIP_ROWS = 16  # rows per strip of the intermediate GeoTIFFs the stream writes into


@dataclass(frozen=True)
class OutputFiles:
    """Where a scene's outputs go: final names in the run folder, work names under `.partial/`."""

    folder: Path
    stem: str
    probabilities: str | None
    previews: bool

    @property
    def classes(self) -> Path:
        return self.folder / f"{self.stem}_classes.tif"

    @property
    def categories(self) -> Path:  # GDAL's sidecar for the class names of a GeoTIFF band (GDAL before 3.12)
        return self.folder / f"{self.stem}_classes.tif.aux.xml"

    @property
    def item(self) -> Path:  # the scene's STAC Item
        return self.folder / f"{self.stem}{stac.ITEM_SUFFIX}"

    def assets(self) -> dict[str, str]:
        """Asset name -> file name of the outputs the Item lists."""
        names = {"classes": self.classes.name, "categories": self.categories.name}
        if self.probabilities:
            names["probabilities"] = f"{self.stem}_probs.tif"
        if self.previews:
            names.update(colour=f"{self.stem}_colour.png", overlay=f"{self.stem}_overlay.png")
        return names

    def final(self) -> list[Path]:
        """Every output, the class raster (the mark of a complete scene) last."""
        names = [f"{self.stem}_probs.tif"] if self.probabilities else []
        names += [f"{self.stem}_colour.png", f"{self.stem}_overlay.png"] if self.previews else []
        return [self.folder / n for n in names] + [self.categories, self.item, self.classes]

    @property
    def work(self) -> Path:
        """This scene's own work folder: only the process that predicts the scene writes or clears it."""
        return self.folder / PARTIAL / self.stem

    def partial(self, name: str) -> Path:
        return self.work / name

    def complete(self) -> bool:
        return all(p.is_file() for p in self.final())

    def clear_partial(self) -> None:
        """The work files a killed run left for this scene."""
        shutil.rmtree(self.work, ignore_errors=True)


def category_names_xml(classes: Sequence[str]) -> str:
    """GDAL's PAM sidecar (`.aux.xml`) holding a band's category names: where GDAL keeps them for a GeoTIFF."""
    items = "".join(f"      <Category>{escape(c)}</Category>\n" for c in classes)
    return (f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n{items}    </CategoryNames>\n'
            "  </PAMRasterBand>\n</PAMDataset>\n")


class SceneWriter:
    """Rows of one scene into striped GeoTIFFs under `.partial/`, then Cloud-Optimized GeoTIFFs, previews, the STAC
    Item, rename.

    Rows arrive in bands (`RowBand`) and are written as they come: the intermediate files are striped, so no
    block row has to be held in memory; GDAL's COG driver then tiles, compresses and adds overviews, reading
    the intermediate through its block cache. The class COG holds its colour table and its class table (names and
    colours, `class_table`) in the file itself.
    """

    def __init__(self, files: OutputFiles, height: int, width: int, crs: Any, transform: Any, loaded: LoadedModel,
                 output: DictConfig, gcps: tuple[list[Any], Any] | None = None,
                 source: stac.SceneSource | None = None) -> None:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.files, self.loaded, self.output = files, loaded, output
        self.height, self.width = height, width
        self.crs, self.transform = crs, transform
        self.source = source or stac.SceneSource(())
        self.counts = np.zeros(256, np.int64)  # pixels per class value (the Item's class counts)
        self.preview = PreviewSampler(loaded, height, width, int(output.preview_size)) if files.previews else None
        files.work.mkdir(parents=True, exist_ok=True)
        profile = {"driver": "GTiff", "height": height, "width": width, "crs": crs, "transform": transform,
                   "blockysize": min(STREAM_STRIP_ROWS, height), "compress": "deflate", "zlevel": 1}
        if transform is None:
            profile.pop("transform")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.classes = rasterio.open(files.partial(f"{files.stem}_classes.stream.tif"), "w", count=1,
                                         dtype="uint8", nodata=NODATA_CLASS, **profile)
            self.classes.write_colormap(1, colour_table(loaded.palette))
            self.classes.update_tags(1, classes=",".join(loaded.classes))
            # the place of the class table in the COG's header (class_table.embed fills it in)
            self.classes.update_tags(1, **{class_table.RESERVED_ITEM: class_table.reservation(loaded.classes,
                                                                                              loaded.palette)})
            self.classes.set_band_description(1, "class")
            self.probs = None
            k = len(loaded.classes)
            if files.probabilities == "uint8":
                self.probs = rasterio.open(files.partial(f"{files.stem}_probs.stream.tif"), "w", count=k,
                                           dtype="uint8", nodata=255, **profile)
                self.probs.scales = [1 / UINT8_PROBABILITY_SCALE] * k
            elif files.probabilities == "float16":
                self.probs = rasterio.open(files.partial(f"{files.stem}_probs.stream.tif"), "w", count=k,
                                           dtype="float32", nbits=16, nodata=float("nan"), **profile)
            if self.probs is not None:
                for i, c in enumerate(loaded.classes):
                    self.probs.set_band_description(i + 1, c)
                self.probs.update_tags(classes=",".join(loaded.classes))
            if gcps is not None:  # GDAL's COG copy keeps them
                for stream in (self.classes, self.probs):
                    if stream is not None:
                        stream.gcps = gcps

    def write(self, band: RowBand) -> None:
        from rasterio.windows import Window

        n = band.probs.shape[1]
        window = Window(0, band.row, self.width, n)
        classes = band.probs.argmax(0).astype(np.uint8)
        classes[~band.valid] = NODATA_CLASS
        self.classes.write(classes, 1, window=window)
        self.counts += np.bincount(classes.ravel(), minlength=256)
        if self.preview is not None:
            self.preview.take_classes(band.row, classes)
        if self.probs is not None:
            if self.files.probabilities == "uint8":
                p = np.rint(band.probs * UINT8_PROBABILITY_SCALE).astype(np.uint8)
                p[:, ~band.valid] = 255
            else:
                p = band.probs.astype(np.float16).astype(np.float32)
                p[:, ~band.valid] = np.nan
            self.probs.write(p, window=window)

    def close(self) -> None:
        self.classes.close()
        if self.probs is not None:
            self.probs.close()

    def finish(self) -> None:
        """Close the streams, convert them to COGs, draw the previews, then move everything into place, the class
        raster last."""
        from rasterio.shutil import copy as copy_raster

        self.close()
        files, output = self.files, self.output
        compress = {"compress": output.compress} if output.compress != "none" else {"compress": "NONE"}
        cog = {"driver": "COG", "blocksize": int(output.blocksize), "overviews": "AUTO", "bigtiff": "IF_SAFER",
               **compress}
        stream = files.partial(f"{files.stem}_classes.stream.tif")
        copy_raster(stream, files.partial(files.classes.name), overview_resampling="MODE", **cog)
        stream.unlink()
        class_table.embed(files.partial(files.classes.name), self.loaded.classes, self.loaded.palette)
        if self.probs is not None:
            stream = files.partial(f"{files.stem}_probs.stream.tif")
            nbits = {"nbits": 16} if files.probabilities == "float16" else {}
            copy_raster(stream, files.partial(f"{files.stem}_probs.tif"), overview_resampling="AVERAGE", **cog,
                        **nbits)
            stream.unlink()
        if files.previews:
            self.write_previews()
        atomic_write_text(files.categories, category_names_xml(self.loaded.classes))
        item = stac.scene_item(files.stem, self.height, self.width, self.crs, self.transform, self.loaded,
                               self.counts, files.assets(), files.probabilities, self.source, NODATA_CLASS,
                               1 / UINT8_PROBABILITY_SCALE)
        atomic_write_json(files.item, item)
        for path in files.final():
            if path not in (files.categories, files.item):
                os.replace(files.partial(path.name), path)
        files.clear_partial()

    def write_previews(self) -> None:
        """`_colour.png` (the palette, nodata transparent) and `_overlay.png` (over the primary modality), both
        sampled (nearest) during the stream: the map at most `output.preview_size` pixels on its long side, the class
        legend in a strip below it. (Reading the finished COG back at preview size took as long as a third of a
        small model's forward over the scene.)"""
        loaded, sampler, files = self.loaded, self.preview, self.files
        classes = sampler.classes
        rgb = colourise(classes, loaded.palette, NODATA_CLASS)
        data = classes != NODATA_CLASS
        colour = np.dstack([rgb, np.where(data, 255, 0).astype(np.uint8)])
        write_png(files.partial(f"{files.stem}_colour.png"), add_legend(colour, loaded.classes, loaded.palette))
        image = preview_rgb(sampler.image, loaded.specs[loaded.modalities[0]])
        blended = np.where(data[..., None], overlay(image, rgb), image)
        write_png(files.partial(f"{files.stem}_overlay.png"), add_legend(blended, loaded.classes, loaded.palette))


class PreviewSampler:
    """The primary modality and the classes at preview size, sampled (nearest) from the windows the predictor reads
    and the rows the writer writes anyway: a second, decimated read of a large raster costs far more (GDAL walks
    every block for it)."""

    def __init__(self, loaded: LoadedModel, height: int, width: int, size: int) -> None:
        self.modality = loaded.modalities[0]
        self.scale = loaded.specs[self.modality].scale
        factor = min(1.0, size / max(height, width))
        self.height, self.width = max(1, round(height * factor)), max(1, round(width * factor))
        self.rows = np.arange(self.height) * height // self.height  # label-grid pixel of each preview pixel
        self.cols = np.arange(self.width) * width // self.width
        self.image: np.ndarray | None = None
        self.classes = np.full((self.height, self.width), NODATA_CLASS, np.uint8)

    def take_classes(self, row: int, classes: np.ndarray) -> None:
        """The preview pixels of a band of finished class rows (label grid rows row..row + len)."""
        r = np.flatnonzero((self.rows >= row) & (self.rows < row + classes.shape[0]))
        if r.size:
            self.classes[r] = classes[self.rows[r] - row][:, self.cols]

    def __call__(self, coords: Sequence[tuple[int, int]], batch: Mapping[str, np.ndarray]) -> None:
        windows = batch[self.modality]
        size = windows.shape[-1] / self.scale  # window size on the label grid
        for (y, x), window in zip(coords, windows):
            if window.ndim == 4:  # a time series: the last date
                window = window[-1]
            window = window[:3]
            if self.image is None:
                self.image = np.zeros((window.shape[0], self.height, self.width), window.dtype)
            r = np.flatnonzero((self.rows >= y) & (self.rows < y + size))
            c = np.flatnonzero((self.cols >= x) & (self.cols < x + size))
            if r.size and c.size:
                local_r = ((self.rows[r] - y) * self.scale).astype(int)
                local_c = ((self.cols[c] - x) * self.scale).astype(int)
                self.image[:, r[:, None], c[None, :]] = window[:, local_r[:, None], local_c[None, :]]


def colour_table(palette: Sequence[Sequence[int]]) -> dict[int, tuple[int, int, int, int]]:
    """The palette as a GeoTIFF colour table; nodata transparent."""
    table = {i: (*(int(v) for v in c), 255) for i, c in enumerate(palette)}
    table[NODATA_CLASS] = (0, 0, 0, 0)
    return table


def write_png(path: Path, image: np.ndarray) -> Path:
    """An RGB(A) uint8 image as PNG, atomically (OpenCV wants BGR(A))."""
    order = cv2.COLOR_RGBA2BGRA if image.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, order))
    if not ok:
        raise DataError(f"could not encode {path} as PNG.")
    return atomic_write(path, lambda p: p.write_bytes(data.tobytes()))

