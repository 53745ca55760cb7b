"""Prediction: a model trained on fake data predicts a projected GeoTIFF scene with nodata borders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from segplat.data.synthetic import make_scene
from segplat.errors import ConfigError, DataError
from segplat.inference import SlidingWindowPredictor, blend_weights, load_for_inference, window_starts
from segplat.train import train
from tests.conftest import TINY, compose_train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(compose_train([*TINY, "trainer.max_epochs=2"], output_dir=run))
    return run


def write_scene(folder: Path, h: int = 90, w: int = 140, border: int = 7, crs: str = "EPSG:32632",
                shift: float = 0.0) -> dict[str, Path]:
    """A real projected GeoTIFF pair (RGB, NIR) with nodata (0) borders."""
    rgb, nir, _ = make_scene(5, 3, 160)
    rgb, nir = rgb[:, :h, :w].copy(), nir[:, :h, :w].copy()
    for a in (rgb, nir):
        a[..., :border, :] = 0
        a[..., :, -border:] = 0
    transform = from_origin(500000.0 + shift, 5600000.0, 10.0, 10.0)
    paths = {}
    for name, a in (("rgb", rgb), ("nir", nir)):
        p = folder / f"scene_{name}.tif"
        with rasterio.open(p, "w", driver="GTiff", height=h, width=w, count=a.shape[0], dtype="uint8", crs=crs,
                           transform=transform, nodata=0) as dst:
            dst.write(a)
        paths[name] = p
    return paths


def test_window_geometry():
    assert window_starts(100, 32, 24) == [0, 24, 48, 68]
    assert window_starts(20, 32, 24) == [0]
    assert window_starts(70, 32, 32) == [0, 32, 38]  # PatchDataset's validation grid: stride = patch
    w = blend_weights(16)
    assert w.shape == (16, 16) and w[8, 8] > w[0, 0] > 0


@pytest.mark.slow
def test_prediction_keeps_crs_transform_size_and_nodata(trained_run: Path, tmp_path: Path):
    paths = write_scene(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "-m", "segplat.predict", f"ckpt={trained_run}",
                           f"input={{rgb:'{paths['rgb']}',nir:'{paths['nir']}'}}",
                           "probabilities=float16", "tta.flips=true", f"hydra.run.dir={out}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"run_dir: {out}"
    with rasterio.open(paths["rgb"]) as src, rasterio.open(out / "scene_rgb_classes.tif") as pred:
        assert pred.crs == src.crs and pred.transform == src.transform
        assert (pred.height, pred.width) == (src.height, src.width)
        assert pred.nodata == 255
        classes = pred.read(1)
    assert (classes[:7, :] == 255).all() and (classes[:, -7:] == 255).all()
    inner = classes[7:, :-7]
    assert inner.max() < 4
    with rasterio.open(out / "scene_rgb_probs.tif") as probs:
        p = probs.read()
        assert p.shape[0] == 4
        assert np.allclose(np.nansum(p[:, 10:, :-10], axis=0), 1.0, atol=4e-3)  # float16: 3 decimals per class
        assert np.isnan(p[:, :7]).all()
    assert (out / "scene_rgb_colour.png").is_file() and (out / "scene_rgb_overlay.png").is_file()


def test_sliding_window_agrees_with_one_big_window(trained_run: Path):
    loaded = load_for_inference(trained_run)
    rgb, nir, _ = make_scene(0, 7, 64)
    arrays = {"rgb": rgb, "nir": nir}
    big = SlidingWindowPredictor(loaded, window=64, overlap=0.0, progress=False).predict(arrays)
    small = SlidingWindowPredictor(loaded, window=32, overlap=0.5, progress=False).predict(arrays)
    assert big.shape == small.shape == (4, 64, 64)
    agree = (big.argmax(0) == small.argmax(0)).mean()
    assert agree > 0.8, agree


def test_bad_inputs_are_named(trained_run: Path, tmp_path: Path):
    loaded = load_for_inference(trained_run)
    predictor = SlidingWindowPredictor(loaded, progress=False)
    rgb, nir, _ = make_scene(0, 1, 64)
    with pytest.raises(ConfigError, match="lacks"):
        predictor.predict({"rgb": rgb})
    with pytest.raises(ConfigError, match="bands"):
        predictor.predict({"rgb": rgb[:2], "nir": nir})

    from omegaconf import OmegaConf

    from segplat.predict import list_scenes

    a_dir = tmp_path / "a"
    a_dir.mkdir()
    a = write_scene(a_dir)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = write_scene(b_dir, crs="EPSG:32633")
    cfg = OmegaConf.create({"input": {"rgb": str(a["rgb"]), "nir": str(b["nir"])}, "split": None})
    with pytest.raises(DataError, match="EPSG:32633"):
        list_scenes(cfg, loaded)
    c_dir = tmp_path / "c"
    c_dir.mkdir()
    c = write_scene(c_dir, shift=500.0)
    cfg = OmegaConf.create({"input": {"rgb": str(a["rgb"]), "nir": str(c["nir"])}, "split": None})
    with pytest.raises(DataError, match=r"not on the same grid \(origin .*: \+50.00 px across"):
        list_scenes(cfg, loaded)
    cfg = OmegaConf.create({"input": {"rgb": str(a["rgb"])}, "split": None})
    with pytest.raises(ConfigError, match=r"input\.nir"):
        list_scenes(cfg, loaded)


def test_output_names_strip_one_raster_suffix():
    from segplat.predict.scenes import output_stem

    assert output_stem("scene.v2.tif") == "scene.v2"
    assert output_stem("S2A_T32TQM.SAFE.TIF") == "S2A_T32TQM.SAFE"
    assert output_stem("img_001.png") == "img_001"
    assert output_stem("scene.v2") == "scene.v2"  # not a raster suffix: kept


@pytest.mark.slow
def test_failed_predict_names_the_key_and_leaves_no_run_folder(tmp_path: Path):
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "-m", "segplat.predict", f"ckpt={tmp_path / 'missing.ckpt'}",
                           f"input={tmp_path}", f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: ckpt={tmp_path / 'missing.ckpt'} does not exist; give a run folder or a .ckpt file."]
    assert not out.exists()
