"""The built-in synthetic dataset: deterministic RGB + NIR cloud scenes with four classes.

Why it looks like this: *thin cloud* is drawn with exactly the RGB distribution of the clear
ground under it and differs only in NIR (it lifts NIR by a fixed amount). An RGB-only model
therefore cannot separate thin cloud from clear sky, while a model that fuses NIR can: the gap
between the two is what fusion buys. Thick cloud (bright in every band) and cloud shadow (a
darkened copy of the ground, offset from the thick cloud that casts it) are visible in RGB.

Scenes are generated from (seed, split, index) alone, so every machine writes the same store.
"""

from __future__ import annotations

import cv2
import numpy as np

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef
from segplat.data.layouts.clouds import MODALITIES as CLOUDS_MODALITIES
from segplat.schema import PositiveInt

CLASSES = ("clear", "thick_cloud", "thin_cloud", "cloud_shadow")
PALETTE = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 0))  # RGB, as the clouds dataset

# ground cover: RGB colour (0..1) and its NIR reflectance
GROUND = (
    ((0.20, 0.45, 0.18), 0.50),  # vegetation
    ((0.50, 0.40, 0.28), 0.32),  # soil
    ((0.10, 0.18, 0.35), 0.06),  # water
    ((0.55, 0.55, 0.55), 0.30),  # urban
)
THIN_CLOUD_NIR_LIFT = 0.30


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = rng.standard_normal((size, size)).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    field -= field.mean()
    return field / (field.std() + 1e-6)


def _blob(rng: np.random.Generator, size: int, sigma: float, coverage: float) -> np.ndarray:
    field = _smooth_field(rng, size, sigma)
    return field > np.quantile(field, 1.0 - coverage)


def make_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: rgb (3, H, W) uint8, nir (1, H, W) uint8, label (H, W) uint8."""
    rng = np.random.default_rng([seed, index])
    # ground: pick a cover per region from a smooth field, then add texture
    cover_field = _smooth_field(rng, size, size / 10)
    edges = np.quantile(cover_field, [0.3, 0.6, 0.85])
    cover = np.digitize(cover_field, edges)
    rgb = np.zeros((3, size, size), np.float32)
    nir = np.zeros((size, size), np.float32)
    for k, (colour, nir_value) in enumerate(GROUND):
        m = cover == k
        for c in range(3):
            rgb[c][m] = colour[c]
        nir[m] = nir_value
    texture = 0.06 * _smooth_field(rng, size, 1.5)
    rgb += texture[None]
    nir += 0.04 * _smooth_field(rng, size, 1.5)

    label = np.zeros((size, size), np.uint8)
    thick = _blob(rng, size, size / 9, rng.uniform(0.08, 0.22))
    shift = rng.integers(size // 10, size // 5, size=2) * rng.choice([-1, 1], size=2)
    shadow = np.roll(thick, tuple(int(s) for s in shift), axis=(0, 1)) & ~thick
    thin = _blob(rng, size, size / 8, rng.uniform(0.10, 0.25)) & ~thick & ~shadow

    # thin cloud: RGB untouched (indistinguishable from ground), NIR lifted
    nir[thin] += THIN_CLOUD_NIR_LIFT
    label[thin] = 2
    # shadow: darker ground in every band
    rgb[:, shadow] *= 0.45
    nir[shadow] *= 0.45
    label[shadow] = 3
    # thick cloud: bright, slightly textured, in every band
    cloud_tex = 0.05 * _smooth_field(rng, size, 3.0)
    rgb[:, thick] = (0.88 + cloud_tex[thick])[None]
    nir[thick] = 0.85 + cloud_tex[thick]
    label[thick] = 1

    rgb += rng.normal(0, 0.015, rgb.shape).astype(np.float32)
    nir += rng.normal(0, 0.015, nir.shape).astype(np.float32)
    to_u8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    return to_u8(rgb), to_u8(nir)[None], label


class SyntheticClouds(Layout):
    """Generated RGB + NIR cloud scenes; needs no root folder."""

    name = "synthetic"
    classes = CLASSES
    palette = PALETTE
    ignore_index = 255

    def __init__(self, root: str | None = None, num_train: PositiveInt = 96, num_val: PositiveInt = 24,
                 scene_size: PositiveInt = 128, seed: int = 0) -> None:
        super().__init__(root)
        self.num = {"train": int(num_train), "val": int(num_val)}
        self.scene_size = int(scene_size)
        self.seed = int(seed)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return dict(CLOUDS_MODALITIES)  # the same streams as the Kaggle clouds data

    def fingerprint_params(self) -> dict:
        return {"name": self.name, "num": self.num, "scene_size": self.scene_size, "seed": self.seed,
                "nir_lift": THIN_CLOUD_NIR_LIFT, "version": 1}

    def scan(self) -> dict[str, list[SampleRef]]:
        return {split: [SampleRef(f"{split}_{i:05d}") for i in range(n)] for split, n in self.num.items()}

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        return self.scene_size, self.scene_size

    def read(self, ref: SampleRef) -> Sample:
        split, idx = ref.id.rsplit("_", 1)
        offset = 0 if split == "train" else 1_000_000
        rgb, nir, label = make_scene(self.seed, offset + int(idx), self.scene_size)
        return Sample(arrays={"rgb": rgb, "nir": nir}, label=label, source=f"synthetic:{ref.id}")
