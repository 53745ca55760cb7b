"""Fake data for the `clouds` layout: a tiny Kaggle "Clouds Segmentation 2025" tree (PNG triplets, BGR labels)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segplat.data.synthetic import make_scene


def write_fake(out_dir: str | Path, seed: int = 0, num_train: int = 40, num_test: int = 2) -> Path:
    """A small Kaggle-clouds tree: non-square PNG triplets (e.g. 88x72) drawn from the synthetic cloud scenes,
    so thin cloud is visible only in NIR and the label is learnable; BGR colour labels as on Kaggle. With the
    default 40 training images the layout's 15 % hash split holds out 6 of them for validation."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    bgr_colours = np.array([[0, 0, 0], [0, 0, 255], [0, 255, 0], [0, 255, 255]], np.uint8)
    for split, n in (("train", num_train), ("test", num_test)):
        for i in range(n):
            h, w = int(rng.integers(66, 100)), int(rng.integers(70, 110))
            rgb, nir, label = make_scene(seed, (0 if split == "train" else 10_000) + i, max(h, w))
            rgb, nir, label = rgb[:, :h, :w], nir[:, :h, :w], label[:h, :w]
            stem = f"{split}_{i:04d}"
            for sub in ("rgb", "ngr", "label") if split == "train" else ("rgb", "ngr"):
                (out / split / sub).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / split / "rgb" / f"{stem}.png"), rgb.transpose(1, 2, 0)[:, :, ::-1])
            green, red = rgb[1], rgb[0]
            ngr_bgr = np.stack([red, green, nir[0]], axis=-1)  # NGR in RGB order, so BGR on disk = (R, G, NIR)
            cv2.imwrite(str(out / split / "ngr" / f"{stem}.png"), ngr_bgr)
            if split == "train":
                cv2.imwrite(str(out / split / "label" / f"{stem}.png"), bgr_colours[label])
    (out / "sample_submission.csv").write_text("Image_Label,EncodedPixels\n" + "".join(
        f"test_{i:04d}.png,1 1\n" for i in range(num_test)))
    return out
