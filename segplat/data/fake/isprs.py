"""Fake data for the ISPRS layouts: tiny Vaihingen and Potsdam trees with their known defects."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from rasterio.transform import from_origin

from segplat.data.fake.common import fake_scene
from segplat.data.layouts.isprs import PALETTE
from segplat.data.raster import write_geotiff

CLASS_RGB = np.array([[128, 128, 128], [170, 70, 60], [120, 170, 80], [40, 110, 40], [200, 200, 40], [120, 60, 150]],
                     np.float32)  # what each class looks like in a true-colour image (impervious grey, roof red, ...)
CLASS_NIR = np.array([60, 70, 200, 220, 80, 100], np.float32)
CLASS_HEIGHT = np.array([0.2, 9.0, 0.3, 7.0, 1.5, 0.8], np.float32)


def _fake_tile(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """label (H, W) 0..5, rgb+nir (4, H, W) uint8 and a DSM (H, W) float32 that follow it."""
    label = fake_scene(rng, h, w, 6)
    colour = np.concatenate([CLASS_RGB, CLASS_NIR[:, None]], axis=1)[label].transpose(2, 0, 1)
    image = np.clip(colour + rng.normal(0, 8, colour.shape), 0, 255).astype(np.uint8)
    dsm = (260.0 + CLASS_HEIGHT[label] + rng.normal(0, 0.2, (h, w))).astype(np.float32)
    return label, image, dsm


def _colour_label(label: np.ndarray) -> np.ndarray:
    return np.array(PALETTE, np.uint8)[label].transpose(2, 0, 1)


def _eroded(label: np.ndarray) -> np.ndarray:
    """The noBoundary variant: pixels whose 3x3 neighbourhood holds another class become black."""
    lab = label.astype(np.uint8)
    edge = (cv2.dilate(lab, np.ones((3, 3), np.uint8)) != cv2.erode(lab, np.ones((3, 3), np.uint8)))
    colour = _colour_label(label)
    colour[:, edge] = 0
    return colour


VAIHINGEN_IDS = ("1", "3", "5", "11", "13", "7", "37", "2", "4")  # train ..., val 7 37 (conf), test 2 4
POTSDAM_IDS = ("2_10", "2_11", "6_7", "7_7", "6_12", "7_12", "3_13", "5_15")  # val 6_12 7_12 (conf), test 3_13 5_15


def write_fake_vaihingen(out_dir: str | Path, seed: int = 0, ids: tuple[str, ...] = VAIHINGEN_IDS,
                         labels_at_root: bool = False) -> Path:
    """top/ (IRRG uint8), dsm/ (float32), ndsm/ (bmp), gts_for_participants/ and gts_eroded_for_participants/;
    the default areas give the shipped config 5 training, 2 validation and 2 test areas."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for k, tid in enumerate(ids):
        h, w = int(rng.integers(90, 140)), int(rng.integers(70, 120))
        label, img4, dsm = _fake_tile(rng, h, w)
        irrg = img4[[3, 0, 1]]
        t = from_origin(496_000 + 200 * k, 5_420_000, 0.09, 0.09)
        write_geotiff(out / "top" / f"top_mosaic_09cm_area{tid}.tif", irrg, "EPSG:32632", t)
        write_geotiff(out / "dsm" / f"dsm_09cm_matching_area{tid}.tif", dsm[None], "EPSG:32632", t)
        (out / "ndsm").mkdir(parents=True, exist_ok=True)
        ndsm = np.clip((dsm - 260.0) * 20, 0, 255).astype(np.uint8)
        cv2.imwrite(str(out / "ndsm" / f"ndsm_09cm_matching_area{tid}.bmp"), ndsm)
        gts = "" if labels_at_root else "gts_for_participants"
        write_geotiff(out / gts / f"top_mosaic_09cm_area{tid}.tif", _colour_label(label), "EPSG:32632", t)
        write_geotiff(out / "gts_eroded_for_participants" / f"top_mosaic_09cm_area{tid}_noBoundary.tif",
                      _eroded(label), "EPSG:32632", t)
    return out


def write_fake_potsdam(out_dir: str | Path, seed: int = 0, ids: tuple[str, ...] = POTSDAM_IDS) -> Path:
    """All Potsdam folders (RGB, IRRG, RGBIR, DSM, nDSM, labels, noBoundary labels) with its known defects:
    3_13's DSM and nDSM one column short, and a few off-palette (252, 255, 0) label pixels; the default tiles
    give the shipped config 4 training, 2 validation and 2 test tiles."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    crs = "EPSG:32633"
    for k, tid in enumerate(ids):
        h, w = int(rng.integers(90, 140)), int(rng.integers(70, 120))
        label, img4, dsm = _fake_tile(rng, h, w)
        t = from_origin(366_000 + 600 * (k % 3), 5_808_000 - 600 * (k // 3), 0.05, 0.05)
        write_geotiff(out / "2_Ortho_RGB" / f"top_potsdam_{tid}_RGB.tif", img4[:3], crs, t)
        write_geotiff(out / "3_Ortho_IRRG" / f"top_potsdam_{tid}_IRRG.tif", img4[[3, 0, 1]], crs, t)
        write_geotiff(out / "4_Ortho_RGBIR" / f"top_potsdam_{tid}_RGBIR.tif", img4, crs, t)
        padded = "_".join(f"{int(p):02d}" for p in tid.split("_"))
        short = tid == "3_13"
        d = dsm[:, :-1] if short else dsm
        write_geotiff(out / "1_DSM" / f"dsm_potsdam_{padded}.tif", d[None], crs, t)
        (out / "1_DSM_normalisation").mkdir(parents=True, exist_ok=True)
        ndsm = np.clip((d - 260.0) * 20, 0, 255).astype(np.uint8)
        cv2.imwrite(str(out / "1_DSM_normalisation" / f"dsm_potsdam_{padded}_normalized_lastools.jpg"), ndsm)
        colour = _colour_label(label)
        if k == 0:  # the known off-palette car colour
            colour[:, :2, :3] = np.array([252, 255, 0], np.uint8)[:, None, None]
        write_geotiff(out / "5_Labels_all" / f"top_potsdam_{tid}_label.tif", colour, crs, t)
        write_geotiff(out / "5_Labels_all_noBoundary" / f"top_potsdam_{tid}_label_noBoundary.tif", _eroded(label),
                      crs, t)
    return out
