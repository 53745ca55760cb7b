"""`python -m segplat.data.fake scene DIR`: the README's predict example runs on what it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from segplat.data.fake import write_fake
from segplat.data.layouts.clouds import MODALITIES as SYNTHETIC_MODALITIES
from segplat.predict import predict
from tests.inference.checkpoints import write_checkpoint
from tests.inference.test_predict_streaming import compose_predict


def test_the_fake_scene_predicts_with_a_model_of_the_synthetic_dataset(tmp_path: Path) -> None:
    root = write_fake("scene", tmp_path / "scene", size=96)
    with rasterio.open(root / "scene_rgb.tif") as rgb, rasterio.open(root / "scene_nir.tif") as nir:
        assert rgb.descriptions == ("red", "green", "blue") and nir.descriptions == ("nir",)
        assert rgb.crs == nir.crs and rgb.crs.to_epsg() == 32633 and rgb.transform == nir.transform
        assert rgb.read().std() > 0 and nir.read().std() > 0
    ckpt = write_checkpoint(tmp_path / "ckpt" / "best.ckpt", SYNTHETIC_MODALITIES)
    cfg = compose_predict([f"ckpt={ckpt}", f"input={{rgb: {root}/scene_rgb.tif, nir: {root}/scene_nir.tif}}"],
                          tmp_path / "out")
    out = predict(cfg)
    with rasterio.open(out / "scene_rgb_classes.tif") as classes:
        assert (classes.width, classes.height) == (96, 96) and classes.crs.to_epsg() == 32633
        assert np.isin(classes.read(1), np.arange(4)).all()
