"""Kaggle "Clouds Segmentation 2025": RGB + NIR PNGs with BGR colour labels (docs/datasets.md).

Tree: `train/{rgb,ngr,label}/STEM.png`, `test/{rgb,ngr}/STEM.png`. NIR is the *red* channel of the
NGR image. Labels are colours (BGR on disk): black background, red thick cloud, green thin cloud,
yellow cloud shadow. PNG is lossless, so labels are normally exact; an off-palette colour within
`colour_tolerance` of one class colour (per channel) is mapped to it and counted in the prepare
notes, anything else is refused naming the file and the colour.

Splits: `val` is carved out of `train` by a seeded hash of the file stem (stable when files are
added), `test` is the unlabelled Kaggle test set (label all ignore; valid where there is data).
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, hash_split
from segplat.data.raster import decode_colour_label
from segplat.errors import DataError
from segplat.schema import NonNegativeInt, Probability

CLASSES = ("background", "thick_cloud", "thin_cloud", "cloud_shadow")
# RGB; on disk (BGR): [0,0,0] [0,0,255] [0,255,0] [0,255,255]
PALETTE = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 0))
IMAGE_SUFFIXES = (".png", ".PNG")
# 8-bit RGB and the NIR plane of the NGR image; the synthetic dataset mimics these streams
MODALITIES = {
    "rgb": ModalitySpec(bands=("red", "green", "blue"), nodata=None, dtype="uint8", optical=True),
    "nir": ModalitySpec(bands=("nir",), nodata=None, dtype="uint8", optical=True),
}


def png_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the PNG header (24 bytes), so scanning ~800 images costs nothing."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError as err:
        raise DataError(f"{path}: cannot be opened ({err.strerror}); check the file's permissions.") from err
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DataError(f"{path}: is not a PNG file (bad header); re-download or remove it.")
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


def imread(path: str | Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """cv2.imread that raises a one-sentence DataError instead of returning None."""
    if not Path(path).is_file():
        raise DataError(f"{path}: the file is missing; every sample needs its rgb, ngr (and label) image.")
    img = cv2.imread(str(path), flags)
    if img is None:
        raise DataError(f"{path}: cannot be decoded as an image (truncated or corrupt); re-download or remove it.")
    return img


def imread_colour(path: str | Path, what: str) -> np.ndarray:
    """An 8-bit 3-channel BGR image, or one sentence: cv2.IMREAD_COLOR would silently copy a grayscale PNG into
    three channels (a grey rgb image, an index label decoded as all background) and scale 16-bit PNGs down."""
    img = imread(path)
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels not in (3, 4):
        raise DataError(f"{path}: is a {channels}-channel image, but every clouds {what} is a 3-channel colour PNG; "
                        "replace it with the colour file from the Kaggle download.")
    if img.dtype != np.uint8:
        raise DataError(f"{path}: holds {img.dtype} pixels, but clouds images are 8-bit; convert it to an 8-bit "
                        "PNG or replace it with the file from the Kaggle download.")
    return img[:, :, :3]  # an alpha channel carries no data


class CloudsLayout(Layout):
    name = "clouds"
    classes = CLASSES
    palette = PALETTE
    ignore_index = 255
    splits = ("train", "val", "test")

    def __init__(self, root: str | None = None, val_fraction: Probability = 0.15, seed: int = 0,
                 include_test: bool = True, colour_tolerance: NonNegativeInt = 8) -> None:
        super().__init__(root)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.include_test = bool(include_test)
        self.colour_tolerance = int(colour_tolerance)
        self.notes: list[str] = []

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return dict(MODALITIES)

    def fingerprint_params(self) -> dict:
        return {"name": self.name, "root": str(self.root), "val_fraction": self.val_fraction, "seed": self.seed,
                "include_test": self.include_test, "colour_tolerance": self.colour_tolerance, "version": 1}

    def scan(self) -> dict[str, list[SampleRef]]:
        root = Path(self.root or ".")
        train_rgb = root / "train" / "rgb"
        if not train_rgb.is_dir():
            raise DataError(f"{train_rgb} is missing; dataset.root must hold train/{{rgb,ngr,label}}/ and "
                            "test/{rgb,ngr}/ as in the Kaggle download.")
        stems = sorted(p.stem for p in train_rgb.iterdir() if p.suffix in IMAGE_SUFFIXES)
        if not stems:
            raise DataError(f"{train_rgb} holds no .png images; point dataset.root at the Kaggle clouds folder.")
        orphans = _orphans(root / "train", stems, ("ngr", "label"))
        if orphans:
            self.notes.append(f"{len(orphans)} ngr/label files have no rgb image and were left out "
                              f"(e.g. {orphans[0]})")
        assign = hash_split(stems, self.val_fraction, self.seed)
        out: dict[str, list[SampleRef]] = {"train": [], "val": []}
        for stem in stems:
            out[assign[stem]].append(self._ref(root / "train", stem, labelled=True))
        if self.include_test and (root / "test" / "rgb").is_dir():
            test = sorted(p.stem for p in (root / "test" / "rgb").iterdir() if p.suffix in IMAGE_SUFFIXES)
            out["test"] = [self._ref(root / "test", s, labelled=False) for s in test]
        return out

    @staticmethod
    def _ref(folder: Path, stem: str, labelled: bool) -> SampleRef:
        files = {"rgb": str(folder / "rgb" / f"{stem}.png"), "ngr": str(folder / "ngr" / f"{stem}.png")}
        if labelled:
            files["label"] = str(folder / "label" / f"{stem}.png")
        return SampleRef(f"{folder.name}/{stem}", files)

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        return png_size(ref.files["rgb"])

    def read(self, ref: SampleRef) -> Sample:
        rgb_path, ngr_path = ref.files["rgb"], ref.files["ngr"]
        bgr = imread_colour(rgb_path, "rgb image")
        ngr = imread_colour(ngr_path, "ngr image (NIR in its red channel)")
        if ngr.shape[:2] != bgr.shape[:2]:
            raise DataError(f"{ngr_path}: is {ngr.shape[1]}x{ngr.shape[0]} but {rgb_path} is "
                            f"{bgr.shape[1]}x{bgr.shape[0]}; the modalities' sizes disagree.")
        rgb = np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))
        nir = np.ascontiguousarray(ngr[:, :, 2][None])  # NGR's red channel is NIR
        if "label" in ref.files:
            lab_path = ref.files["label"]
            lab_bgr = imread_colour(lab_path, "label (black, red, green, yellow)")
            if lab_bgr.shape[:2] != bgr.shape[:2]:
                raise DataError(f"{lab_path}: is {lab_bgr.shape[1]}x{lab_bgr.shape[0]} but {rgb_path} is "
                                f"{bgr.shape[1]}x{bgr.shape[0]}; the label and image sizes disagree.")
            label, remapped = decode_colour_label(lab_bgr[:, :, ::-1], self.palette, lab_path,
                                                  ignore_index=self.ignore_index, tolerance=self.colour_tolerance)
            if remapped:
                self.notes.append(f"{lab_path}: {remapped} off-palette label pixels mapped to the nearest class")
        else:
            label = np.full(bgr.shape[:2], self.ignore_index, np.uint8)
        return Sample(arrays={"rgb": rgb, "nir": nir}, label=label, source=rgb_path)


def _orphans(folder: Path, stems: list[str], subdirs: tuple[str, ...]) -> list[str]:
    known = set(stems)
    out = []
    for sub in subdirs:
        d = folder / sub
        if d.is_dir():
            out += [str(p) for p in sorted(d.iterdir()) if p.suffix in IMAGE_SUFFIXES and p.stem not in known]
    return out
