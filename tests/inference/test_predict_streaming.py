"""Streamed prediction equals whole-scene prediction, and its outputs are Cloud-Optimized GeoTIFFs a GIS reads right.

The checkpoint takes two modalities on different grids (`rgb` at 10 m, `coarse` at 20 m: scale 0.5), the
scenes are real GeoTIFFs whose sizes are not multiples of the window, with nodata borders. The reference
below holds the whole scene in memory (padded arrays, one probability sum per pixel), as prediction did
before it streamed; the streamed path reads windows from the files and blends them in a ring of rows.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest
import rasterio
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from segplat.data.store import _nodata_mask, _resize_nearest_mask
from segplat.data.windows import grid_alignment
from segplat.errors import ConfigError
from segplat.inference import SlidingWindowPredictor, add_legend, fill_value, load_for_inference
from segplat.predict import predict
from segplat.predict.scenes import RasterSource, open_input
from tests.conftest import CONF_DIR
from tests.inference.checkpoints import CLASSES, PALETTE
from tests.inference.scenes import WINDOW, scene_arrays, two_grid_checkpoint, write_geotiffs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return two_grid_checkpoint(tmp_path_factory.mktemp("ckpt") / "two_grids.ckpt")


def whole_scene_reference(predictor: SlidingWindowPredictor, arrays: dict[str, np.ndarray]
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (K, H, W) and the valid mask of a scene held whole in memory: pad every modality, sum every
    window's weighted probabilities into scene-sized arrays, divide; nodata where every modality is nodata."""
    loaded = predictor.loaded
    height, width = predictor.check_shapes({m: a.shape for m, a in arrays.items()})
    grid = predictor.grid(height, width)
    win = predictor.window
    padded = {}
    for m, spec in loaded.specs.items():
        a = arrays[m]
        th, tw = round(grid.padded_height * spec.scale), round(grid.padded_width * spec.scale)
        padded[m] = np.pad(a, [(0, 0), (0, th - a.shape[-2]), (0, tw - a.shape[-1])],
                           constant_values=fill_value(spec, a.dtype))
    acc = np.zeros((len(loaded.classes), grid.padded_height, grid.padded_width), np.float32)
    weight = np.zeros((grid.padded_height, grid.padded_width), np.float32)
    coords = [(y, x) for y in grid.rows for x in grid.cols]
    for i in range(0, len(coords), predictor.batch_size):
        chunk = coords[i:i + predictor.batch_size]
        batch = {}
        for m, spec in loaded.specs.items():
            s, size = spec.scale, round(win * spec.scale)
            batch[m] = np.stack([padded[m][:, round(y * s):round(y * s) + size, round(x * s):round(x * s) + size]
                                 for y, x in chunk])
        for (y, x), p in zip(chunk, predictor.window_probs(batch)):
            acc[:, y:y + win, x:x + win] += p * predictor.weights
            weight[y:y + win, x:x + win] += predictor.weights
    acc /= np.maximum(weight, 1e-8)
    empty = np.ones((height, width), bool)
    for m, a in arrays.items():
        empty &= _resize_nearest_mask(_nodata_mask(a, loaded.specs[m].nodata), (height, width))
    return acc[:, :height, :width], ~empty


class SpySource(RasterSource):
    """Records every read, to show that the stream reads windows and hands rows out before the scene is done."""

    log: ClassVar[list[tuple[int, int]]] = []

    def read(self, row, col, height, width, fill):
        self.log.append((height, width))
        return super().read(row, col, height, width, fill)


@pytest.mark.parametrize("size", [(202, 170), (131, 97)])
def test_streamed_equals_whole_scene_on_two_grids(checkpoint: Path, tmp_path: Path, size: tuple[int, int]):
    arrays = scene_arrays(*size)
    paths = write_geotiffs(tmp_path, arrays)
    loaded = load_for_inference(checkpoint)
    predictor = SlidingWindowPredictor(loaded, window=WINDOW, overlap=0.25, batch_size=3, progress=False)
    assert grid_alignment(s.scale for s in loaded.specs.values()) == 2 and predictor.stride % 2 == 0
    grid = predictor.grid(*size)
    assert size[0] % WINDOW and size[1] % WINDOW and len(grid.rows) >= 3 and len(grid.cols) >= 2
    assert all(y % 2 == 0 for y in grid.rows) and all(x % 2 == 0 for x in grid.cols)

    ref_probs, ref_valid = whole_scene_reference(predictor, arrays)
    SpySource.log = []
    reads_at_first_band = None
    with open_input(paths["rgb"]) as a, open_input(paths["coarse"]) as b:
        sources = {"rgb": SpySource(a), "coarse": SpySource(b)}
        bands = []
        for band in predictor.stream(sources, {"rgb": 0, "coarse": 0}):
            reads_at_first_band = reads_at_first_band or len(SpySource.log)
            bands.append(band)
    probs = np.concatenate([band.probs for band in bands], axis=1)
    valid = np.concatenate([band.valid for band in bands])
    assert [band.row for band in bands] == list(np.cumsum([0] + [band.probs.shape[1] for band in bands[:-1]]))

    assert probs.shape == ref_probs.shape == (len(CLASSES), *size)
    np.testing.assert_allclose(probs, ref_probs, rtol=0, atol=1e-6)
    assert np.array_equal(probs.argmax(0), ref_probs.argmax(0))
    assert np.array_equal(valid, ref_valid)
    classes = np.where(valid, probs.argmax(0), 255)
    assert set(np.unique(classes[valid])) == {0, 1, 2, 3}  # every class wins somewhere: the check is not empty
    assert (classes[:9] == 255).all() and (classes[:, -9:] == 255).all() and valid[10:, :-10].all()
    # windows, not scenes: every read is one window of one modality on its own grid, rows leave early
    assert max(SpySource.log) == (WINDOW, WINDOW) and (WINDOW // 2, WINDOW // 2) in SpySource.log
    assert len(SpySource.log) == 2 * grid.num_windows
    assert reads_at_first_band < len(SpySource.log)  # the first rows left before the last windows were read


def compose_predict(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def gdal_category_names(path: Path) -> list[str]:
    """Category names of band 1 as GDAL itself reads them (rasterio has no call for them): rasterio's own libgdal."""
    libs = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), "..", "rasterio.libs", "libgdal*"))
    if not libs:
        pytest.skip("rasterio's bundled libgdal was not found")
    gdal = ctypes.CDLL(libs[0])
    gdal.GDALOpenEx.restype = ctypes.c_void_p
    gdal.GDALOpenEx.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    gdal.GDALGetRasterBand.restype = ctypes.c_void_p
    gdal.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALGetGeoTransform.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
    gdal.GDALGetRasterCategoryNames.restype = ctypes.c_void_p
    gdal.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    gdal.CSLCount.argtypes = [ctypes.c_void_p]
    gdal.CSLGetField.restype = ctypes.c_char_p
    gdal.CSLGetField.argtypes = [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALClose.argtypes = [ctypes.c_void_p]
    gdal.GDALAllRegister()
    handle = gdal.GDALOpenEx(str(path).encode(), 0x02, None, None, None)  # GDAL_OF_RASTER
    assert handle, f"GDAL cannot open {path}"
    try:
        gdal.GDALGetGeoTransform(handle, (ctypes.c_double * 6)())  # as gdalinfo: loads the .aux.xml (PAM)
        names = gdal.GDALGetRasterCategoryNames(gdal.GDALGetRasterBand(handle, 1))
        return [gdal.CSLGetField(names, i).decode() for i in range(gdal.CSLCount(names))] if names else []
    finally:
        gdal.GDALClose(handle)


def expected_overviews(height: int, width: int, block: int) -> list[int]:
    """GDAL's COG driver (OVERVIEWS=AUTO): halve until the overview fits in one block."""
    factors, f = [], 1
    while max(-(-height // f), -(-width // f)) > block:
        f *= 2
        factors.append(f)
    return factors


def test_outputs_are_cogs_with_palette_categories_and_georeference(checkpoint: Path, tmp_path: Path):
    arrays = scene_arrays(202, 170)
    paths = write_geotiffs(tmp_path / "in", arrays, stem="scene.v2")
    out = tmp_path / "out"
    cfg = compose_predict([f"ckpt={checkpoint}", f"input={{rgb: '{paths['rgb']}', coarse: '{paths['coarse']}'}}",
                           f"window={WINDOW}", "probabilities=uint8", "output.blocksize=64", "output.compress=zstd",
                           "progress=false"], out)
    predict(cfg)
    stem = "scene.v2_rgb"  # one suffix stripped, never two
    loaded = load_for_inference(checkpoint)
    ref_probs, ref_valid = whole_scene_reference(
        SlidingWindowPredictor(loaded, window=WINDOW, overlap=0.25, batch_size=4, progress=False), arrays)
    with rasterio.open(out / f"{stem}_classes.tif") as pred, rasterio.open(paths["rgb"]) as src:
        assert pred.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert pred.compression.value == "ZSTD" and pred.block_shapes == [(64, 64)] and pred.is_tiled
        assert pred.overviews(1) == expected_overviews(202, 170, 64) == [2, 4]
        assert (pred.crs, pred.transform, pred.shape) == (src.crs, src.transform, src.shape)
        assert pred.nodata == 255 and pred.dtypes[0] == "uint8"
        table = pred.colormap(1)
        assert [table[i][:3] for i in range(len(PALETTE))] == [tuple(c) for c in PALETTE] and table[255][3] == 0
        assert pred.tags(1)["classes"] == ",".join(CLASSES)
        classes = pred.read(1)
        overview = pred.read(1, out_shape=(51, 43))
    assert gdal_category_names(out / f"{stem}_classes.tif") == list(CLASSES)
    assert np.array_equal(classes, np.where(ref_valid, ref_probs.argmax(0), 255))
    assert set(np.unique(overview)) <= {0, 1, 2, 3, 255}  # mode resampling: no invented class values
    with rasterio.open(out / f"{stem}_probs.tif") as probs:
        assert probs.count == len(CLASSES) and probs.dtypes[0] == "uint8" and probs.nodata == 255
        assert probs.descriptions == CLASSES and probs.scales == (1 / 254,) * len(CLASSES)
        stored = probs.read()
    assert np.abs(stored[:, ref_valid] / 254 - ref_probs[:, ref_valid]).max() <= 0.5 / 254 + 1e-6
    assert (stored[:, ~ref_valid] == 255).all()
    colour = cv2.imread(str(out / f"{stem}_colour.png"), cv2.IMREAD_UNCHANGED)
    assert colour.shape[2] == 4 and colour.shape[0] > 202
    assert (colour[:202, :170, 3] == np.where(ref_valid, 255, 0)).all()  # nodata transparent
    assert (out / f"{stem}_overlay.png").is_file() and not (out / ".partial").exists()


def test_float16_probabilities_and_previews_are_bounded(checkpoint: Path, tmp_path: Path):
    arrays = scene_arrays(131, 97)
    paths = write_geotiffs(tmp_path / "in", arrays)
    out = tmp_path / "out"
    predict(compose_predict([f"ckpt={checkpoint}", f"input={{rgb: '{paths['rgb']}', coarse: '{paths['coarse']}'}}",
                             f"window={WINDOW}", "probabilities=float16", "output.preview_size=50",
                             "progress=false"], out))
    loaded = load_for_inference(checkpoint)
    ref_probs, ref_valid = whole_scene_reference(
        SlidingWindowPredictor(loaded, window=WINDOW, overlap=0.25, batch_size=4, progress=False), arrays)
    with rasterio.open(out / "scene_rgb_probs.tif") as probs:
        assert probs.tags(1, ns="IMAGE_STRUCTURE")["NBITS"] == "16" and probs.overviews(1) == []
        stored = probs.read()
    assert np.array_equal(stored[:, ref_valid], ref_probs[:, ref_valid].astype(np.float16).astype(np.float32))
    assert np.isnan(stored[:, ~ref_valid]).all()
    overlay = cv2.imread(str(out / "scene_rgb_overlay.png"))
    assert overlay.shape[1] == 240 and overlay.shape[0] > 50  # 50 px scene preview + a legend strip
    with pytest.raises(ConfigError, match=r"^probabilities=true is not known; use uint8, float16 or null; uint8 = "):
        predict(compose_predict([f"ckpt={checkpoint}", f"input={paths['rgb']}", "probabilities=true"], tmp_path / "x"))


def test_legend_names_every_class_in_its_colour():
    image = np.full((40, 300, 3), 7, np.uint8)
    out = add_legend(image, CLASSES, PALETTE)
    assert np.array_equal(out[:40], image) and out.shape[0] > 40
    strip = out[40:].reshape(-1, 3)
    for colour in PALETTE[1:]:
        assert (strip == colour).all(axis=1).sum() >= 25  # a swatch of at least 5x5 px
    assert (strip == 0).all(axis=1).sum() > 25  # black text and the black swatch
    narrow = add_legend(np.zeros((10, 20, 4), np.uint8), ["a" * 30, "b" * 30], PALETTE)
    assert narrow.shape[1] == 240 and narrow.shape[2] == 4 and (narrow[10:, :, 3] == 255).all()


def test_preview_is_sampled_from_the_windows_as_read(checkpoint: Path):
    from segplat.inference import ArraySource
    from segplat.predict.writer import PreviewSampler

    arrays = scene_arrays(131, 97)
    loaded = load_for_inference(checkpoint)
    predictor = SlidingWindowPredictor(loaded, window=WINDOW, overlap=0.25, batch_size=3, progress=False)
    sampler = PreviewSampler(loaded, 131, 97, size=50)
    for _ in predictor.stream({m: ArraySource(a) for m, a in arrays.items()}, observe=sampler):
        pass
    assert (sampler.height, sampler.width) == (50, 37)
    assert np.array_equal(sampler.image, arrays["rgb"][:, sampler.rows][:, :, sampler.cols])


def test_forward_batch_is_the_model_on_preprocessed_inputs_and_averages_views(checkpoint: Path):
    import torch

    from segplat.inference import forward_batch

    loaded = load_for_inference(checkpoint)
    arrays = scene_arrays(64, 64, border=0)
    batch = {m: torch.from_numpy(np.stack([a, a[..., ::-1, :].copy()])) for m, a in arrays.items()}
    batch["label"] = torch.zeros(2, 64, 64, dtype=torch.uint8)  # other keys are left alone
    model, pre = loaded.model, loaded.preprocessor
    with torch.no_grad():
        plain = model(pre({m: batch[m] for m in loaded.modalities}))["out"]
        mirrored = model(pre({m: batch[m].flip(-1) for m in loaded.modalities}))["out"].flip(-1)
    assert torch.equal(forward_batch(model, pre, batch, "cpu"), plain)
    assert torch.allclose(forward_batch(model, pre, batch, "cpu", views=[(1.0, True, False)]), mirrored, atol=1e-6)
    both = forward_batch(model, pre, batch, "cpu", views=[(1.0, False, False), (1.0, True, False)])
    assert torch.allclose(both, (plain + mirrored) / 2, atol=1e-6) and not torch.allclose(both, plain, atol=1e-3)
