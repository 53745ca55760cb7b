"""ISPRS 2-D semantic labelling: Vaihingen (IRRG + DSM) and Potsdam (RGB / IRRG / RGBIR + DSM), docs/datasets.md.

Both ship large aerial tiles with colour-coded labels in the same 6-class palette; the eroded
`noBoundary` labels paint class boundaries black, which becomes the ignore index. The splits are the
ones TorchGeo and mmsegmentation use (class constants); Vaihingen also has the MS2MNet/Audebert
split (test on areas 5 15 21 30). Modalities: `image` and `dsm` (absolute DSM as float32, or the
normalised nDSM images as uint8; `elevation: none` drops it).

Grids: image, DSM and label of a tile must lie on one grid when both files are georeferenced (CRS, origin,
pixel size: `segplat.data.raster`); another grid is refused naming both files, or warped onto the
image's with `resample: true`. Files without georeferencing (the nDSM images, labels saved as plain
TIFFs) are paired by size, and the prepare notes count them. `image_bands` picks bands of the image by
name (its band description, else the product's documented order) or 1-based index; `val_tiles` moves
tiles out of train into a `val` split, so that checkpoints are not chosen on the test tiles.

Known defects handled: Potsdam 3_13's DSM/nDSM is one column short (edge-replicated, and noted);
off-palette label colours such as (252, 255, 0) are mapped to the nearest class colour within
`colour_tolerance` and the number of pixels touched is noted. Label archives unpacked at the root
are found too (each label folder is searched, then the root).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from rasterio.warp import Resampling

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, band_names
from segplat.data.raster import (
    Grid,
    decode_colour_label,
    georef,
    grid_relation,
    raster_header,
    read_on_grid,
    read_raster,
    warp_to_grid,
)
from segplat.errors import ConfigError, DataError
from segplat.schema import Hint, NonNegativeInt, PositiveInt
from segplat.utils.plain import to_plain

log = logging.getLogger(__name__)

CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
MAX_EDGE_PAD = 2  # DSMs this many pixels short of the image are edge-padded (the 3_13 defect); more is an error


class _ISPRSLayout(Layout):
    """What Vaihingen and Potsdam share: colour labels, DSM handling, split constants, searching folders."""

    classes = CLASSES
    palette = PALETTE
    ignore_index = 255
    splits = ("train", "val", "test")
    SPLITS: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {}
    IMAGE_BANDS: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, root: str | None = None, image: str = "irrg",
                 elevation: Annotated[Literal["dsm", "ndsm", "none"], Hint("the elevation stream")] = "dsm",
                 eroded: bool = False, split: str = "standard", colour_tolerance: NonNegativeInt = 8,
                 image_bands: Sequence[str | PositiveInt] | None = None, val_tiles: Sequence[str | int] | None = None,
                 resample: bool = False) -> None:
        """`image` and `split` are typed by each dataset's own constructor (its images and splits)."""
        super().__init__(root)
        self.image_bands = band_names(image_bands, self.IMAGE_BANDS[image], "dataset.layout.image_bands",
                                      f"the {image.upper()} image")
        self.image, self.elevation, self.eroded, self.split = image, elevation, bool(eroded), split
        self.colour_tolerance = int(colour_tolerance)
        self.val_tiles = tuple(str(t) for t in (to_plain(val_tiles) or ()))
        outside = [t for t in self.val_tiles if t not in self.SPLITS[split]["train"]]
        if outside:
            raise ConfigError(f"dataset.layout.val_tiles names {outside}, which are not training tiles of the "
                              f"{split} split ({' '.join(self.SPLITS[split]['train'])}); pick validation tiles "
                              "from these.")
        self.resample = bool(resample)
        self._notes: list[str] = []
        self.plain_pairs = 0  # files without georeferencing, paired with their image by size

    @property
    def notes(self) -> list[str]:
        """What prepare records beside the skips."""
        extra = [f"{self.plain_pairs} DSM/label file(s) carry no georeferencing (or their image does not) and were "
                 "paired with their image by size"] if self.plain_pairs else []
        return [*self._notes, *extra]

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        mods = {"image": ModalitySpec(bands=self.image_bands, nodata=None, dtype="uint8", optical=True)}
        if self.elevation == "dsm":
            mods["dsm"] = ModalitySpec(bands=("dsm",), nodata=None, dtype="float32", optical=False)
        elif self.elevation == "ndsm":
            mods["dsm"] = ModalitySpec(bands=("ndsm",), nodata=None, dtype="uint8", optical=False)
        return mods

    def fingerprint_params(self) -> dict[str, Any]:
        return {"name": self.name, "root": str(self.root), "image": self.image, "elevation": self.elevation,
                "eroded": self.eroded, "split": self.split, "colour_tolerance": self.colour_tolerance,
                "image_bands": list(self.image_bands), "val_tiles": list(self.val_tiles), "resample": self.resample,
                "version": 2}

    # subclasses: file names per tile id
    def image_path(self, root: Path, tid: str) -> Path: ...
    def dsm_path(self, root: Path, tid: str) -> Path: ...
    def label_path(self, root: Path, tid: str) -> Path: ...

    def _first(self, root: Path, folders: tuple[str, ...], names: tuple[str, ...]) -> Path:
        """The first existing `folder/name` (folders in order, then the root); else the canonical path."""
        for folder in (*folders, ""):
            for name in names:
                p = root / folder / name if folder else root / name
                if p.is_file():
                    return p
        return root / folders[0] / names[0]

    def scan(self) -> dict[str, list[SampleRef]]:
        root = Path(self.root or ".")
        out: dict[str, list[SampleRef]] = {}
        present = 0
        absent = []
        splits = dict(self.SPLITS[self.split])
        if self.val_tiles:
            splits = {"train": tuple(t for t in splits["train"] if t not in self.val_tiles), "val": self.val_tiles,
                      **{k: v for k, v in splits.items() if k != "train"}}
        for split, ids in splits.items():
            refs = []
            for tid in ids:
                img = self.image_path(root, tid)
                if not img.is_file():
                    absent.append(tid)
                    continue
                files = {"image": str(img), "label": str(self.label_path(root, tid))}
                if self.elevation != "none":
                    files["dsm"] = str(self.dsm_path(root, tid))
                refs.append(SampleRef(tid, files))
            present += len(refs)
            out[split] = refs
        if not present:
            example = self.image_path(root, self.SPLITS[self.split]["train"][0])
            raise DataError(f"no {self.name} image tiles under {root} (looked for e.g. {example}); point "
                            f"dataset.root at the {self.name} folder.")
        if absent:
            self._notes.append(f"{len(absent)} tiles of the {self.split} split are not under {root} and were left "
                              f"out: {' '.join(absent[:12])}{' ...' if len(absent) > 12 else ''}")
        return out

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        h = raster_header(ref.files["image"])
        return int(h["height"]), int(h["width"])

    def read(self, ref: SampleRef) -> Sample:
        img_path = ref.files["image"]
        names = self.IMAGE_BANDS[self.image]
        bands = None if self.image_bands == names else self.image_bands
        image, header = read_raster(img_path, bands, "dataset.layout.image_bands", names)
        if image.shape[0] != len(self.image_bands):
            raise DataError(f"{img_path}: has {image.shape[0]} bands but {self.image.upper()} needs {len(names)} "
                            f"({', '.join(names)}); check dataset.layout.image or pick bands with "
                            "dataset.layout.image_bands.")
        if image.dtype != np.uint8:
            raise DataError(f"{img_path}: is {image.dtype} but ISPRS orthophotos are 8-bit; check the file.")
        h, w = image.shape[-2:]
        grid = Grid.of(header)
        arrays = {"image": image}
        if self.elevation != "none":
            dsm_path = ref.files["dsm"]
            dsm, _, relation = read_on_grid(dsm_path, grid, img_path, what="dsm", nodata=None, resample=self.resample,
                                            bands=[1], plain_ok=True, check_size=False)
            self.plain_pairs += relation == "plain"
            dsm = dsm.astype(self.modalities["dsm"].dtype, copy=False)
            arrays["dsm"] = self._fit(dsm, h, w, dsm_path, img_path)
        lab_path = ref.files["label"]
        lab, lab_header = read_raster(lab_path)
        if lab.shape[0] < 3:
            raise DataError(f"{lab_path}: has {lab.shape[0]} band(s) but ISPRS labels are RGB colour images; "
                            "check the label folder.")
        lab_grid = Grid.of(lab_header)
        relation = grid_relation(lab_grid, lab_path, grid, img_path, self.resample, plain_ok=True, check_size=False)
        self.plain_pairs += relation == "plain"
        if relation != "warp" and lab.shape[-2:] != (h, w):
            raise DataError(f"{lab_path}: is {lab.shape[-1]}x{lab.shape[-2]} but {img_path} is {w}x{h}; the label "
                            "and image sizes disagree.")
        ignore = ((0, 0, 0),) if self.eroded else ()
        label, remapped = decode_colour_label(np.moveaxis(lab[:3], 0, -1), self.palette, lab_path,
                                              ignore_colours=ignore, ignore_index=self.ignore_index,
                                              tolerance=self.colour_tolerance)
        if relation == "warp":
            warped, covered = warp_to_grid(label[None], lab_grid, grid, self.ignore_index, Resampling.nearest)
            label = np.where(covered, warped[0], self.ignore_index).astype(np.uint8)
        if remapped:
            self._notes.append(f"{lab_path}: {remapped} off-palette label pixels mapped to the nearest class colour")
            log.info("%s: %d off-palette label pixels mapped to the nearest class colour", lab_path, remapped)
        crs, transform = georef(header)
        return Sample(arrays=arrays, label=label, source=img_path, crs=crs, transform=transform)

    def _fit(self, dsm: np.ndarray, h: int, w: int, path: str, img_path: str) -> np.ndarray:
        """Edge-pad a DSM a pixel or two short of the image (Potsdam 3_13); leave larger mismatches to the store."""
        dh, dw = h - dsm.shape[-2], w - dsm.shape[-1]
        if (dh, dw) != (0, 0) and 0 <= dh <= MAX_EDGE_PAD and 0 <= dw <= MAX_EDGE_PAD:
            self._notes.append(f"{path}: {dsm.shape[-1]}x{dsm.shape[-2]} is {dw} column(s) and {dh} row(s) short of "
                              f"{img_path}; padded by repeating the edge")
            log.info("%s is %d column(s), %d row(s) short; edge-padded", path, dw, dh)
            return np.pad(dsm, ((0, 0), (0, dh), (0, dw)), mode="edge")
        return dsm


_VAIHINGEN_TRAIN = ("1", "3", "5", "7", "11", "13", "15", "17", "21", "23", "26", "28", "30", "32", "34", "37")
_MS2MNET_TEST = ("5", "15", "21", "30")


class VaihingenLayout(_ISPRSLayout):
    name = "vaihingen"
    IMAGE_BANDS: ClassVar[dict[str, tuple[str, ...]]] = {"irrg": ("nir", "red", "green")}
    TRAIN = _VAIHINGEN_TRAIN
    TEST = ("2", "4", "6", "8", "10", "12", "14", "16", "20", "22", "24", "27", "29", "31", "33", "35", "38")
    MS2MNET_TEST = _MS2MNET_TEST
    SPLITS: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "standard": {"train": TRAIN, "test": TEST},
        # Audebert et al.'s split, used by MS2MNet/CMFNet-style fusion papers: 12 train areas, 4 test areas
        "ms2mnet": {"train": tuple(t for t in _VAIHINGEN_TRAIN if t not in _MS2MNET_TEST), "test": MS2MNET_TEST},
    }

    def __init__(self, root: str | None = None,
                 image: Annotated[Literal["irrg"], Hint("Vaihingen ships IRRG images only")] = "irrg",
                 split: Literal["standard", "ms2mnet"] = "standard", **kwargs: Any) -> None:
        super().__init__(root, image=image, split=split, **kwargs)

    def image_path(self, root: Path, tid: str) -> Path:
        return self._first(root, ("top",), (f"top_mosaic_09cm_area{tid}.tif",))

    def dsm_path(self, root: Path, tid: str) -> Path:
        if self.elevation == "ndsm":
            return self._first(root, ("ndsm",), (f"ndsm_09cm_matching_area{tid}.bmp",
                                                 f"ndsm_09cm_matching_area{tid}.tif"))
        return self._first(root, ("dsm",), (f"dsm_09cm_matching_area{tid}.tif",))

    def label_path(self, root: Path, tid: str) -> Path:
        if self.eroded:
            return self._first(root, ("gts_eroded_for_participants", "ISPRS_semantic_labeling_Vaihingen_ground_truth_"
                                      "eroded_COMPLETE"), (f"top_mosaic_09cm_area{tid}_noBoundary.tif",))
        # the full labels share the image's file name, so the root is searched only outside top/
        return self._first(root, ("gts_for_participants", "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE"),
                           (f"top_mosaic_09cm_area{tid}.tif",))


class PotsdamLayout(_ISPRSLayout):
    name = "potsdam"
    IMAGE_BANDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "rgb": ("red", "green", "blue"), "irrg": ("nir", "red", "green"), "rgbir": ("red", "green", "blue", "nir")}
    IMAGE_FOLDERS: ClassVar[dict[str, tuple[str, str]]] = {
        "rgb": ("2_Ortho_RGB", "RGB"), "irrg": ("3_Ortho_IRRG", "IRRG"), "rgbir": ("4_Ortho_RGBIR", "RGBIR")}
    TRAIN = ("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12", "6_10",
             "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7", "7_8", "7_9")
    TEST = ("5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13", "4_13", "3_14",
            "7_13")
    SPLITS: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {"standard": {"train": TRAIN, "test": TEST}}

    def __init__(self, root: str | None = None, image: Literal["rgb", "irrg", "rgbir"] = "rgb",
                 split: Literal["standard"] = "standard", **kwargs: Any) -> None:
        super().__init__(root, image=image, split=split, **kwargs)

    def image_path(self, root: Path, tid: str) -> Path:
        folder, suffix = self.IMAGE_FOLDERS[self.image]
        return self._first(root, (folder,), (f"top_potsdam_{tid}_{suffix}.tif",))

    def dsm_path(self, root: Path, tid: str) -> Path:
        padded = "_".join(f"{int(p):02d}" for p in tid.split("_"))
        if self.elevation == "ndsm":
            return self._first(root, ("1_DSM_normalisation",), (f"dsm_potsdam_{padded}_normalized_lastools.jpg",
                                                                f"dsm_potsdam_{padded}_normalized_ownapproach.jpg"))
        return self._first(root, ("1_DSM",), (f"dsm_potsdam_{padded}.tif",))

    def label_path(self, root: Path, tid: str) -> Path:
        if self.eroded:
            return self._first(root, ("5_Labels_all_noBoundary", "5_Labels_for_participants_no_Boundary"),
                               (f"top_potsdam_{tid}_label_noBoundary.tif",))
        return self._first(root, ("5_Labels_all", "5_Labels_for_participants"), (f"top_potsdam_{tid}_label.tif",))
