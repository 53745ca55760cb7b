"""Sen1Floods11 v1.1, hand-labelled chips: Sentinel-1 + Sentinel-2 with water labels (docs/datasets.md).

Tree under `v1.1/` (dataset.root may be the folder holding `v1.1`, `v1.1` itself, or `HandLabeled`):
`data/flood_events/HandLabeled/{S1Hand,S2Hand,LabelHand}/EVENT_CHIP_{S1Hand,S2Hand,LabelHand}.tif`
(repackagings: `S1GRDHand`, `S2L1CHand`) and `splits/flood_handlabeled/flood_{train,valid,test,bolivia}_data.csv`
(no header; S1 file, label file) or `.txt` files with one chip id per line.

- s1: float32 VV, VH in dB, nodata NaN (`s1_bands` picks some).
- s2: 13 L1C bands B1..B12 with B8A, reflectance x10000, int16 (uint16 read too, clipped to int16), nodata 0.
  `output_bands` picks bands by name (the file's band description when it has one, else the documented
  order) or by 1-based index, so a backbone gets exactly the channels it was trained on.
- label: int16, -1 no data -> ignore index, 0 dry, 1 water.

S1, S2 and label chips of one id must lie on one grid (CRS, transform, size: `segplat.data.raster`);
another grid is refused naming both files, or warped onto the label's with `resample: true`.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from annotated_types import MinLen

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, band_names
from segplat.data.raster import Grid, georef, raster_header, read_on_grid, read_raster
from segplat.errors import DataError
from segplat.schema import PositiveInt

S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S1_BANDS = ("VV", "VH")
SPLIT_FILES = {"train": "flood_train_data", "val": "flood_valid_data", "test": "flood_test_data",
               "bolivia": "flood_bolivia_data"}
FOLDERS = {"s1": ("S1Hand", "S1GRDHand"), "s2": ("S2Hand", "S2L1CHand"), "label": ("LabelHand",)}


class Sen1Floods11Layout(Layout):
    name = "sen1floods11"
    classes = ("dry", "water")
    palette = ((0, 0, 0), (0, 90, 255))
    ignore_index = 255
    splits = ("train", "val", "test", "bolivia")

    def __init__(self, root: str | None = None,
                 sensors: Annotated[Sequence[Literal["s1", "s2"]], MinLen(1)] = ("s1", "s2"),
                 output_bands: Sequence[str | PositiveInt] | None = None,
                 s1_bands: Sequence[str | PositiveInt] | None = None,
                 splits: Sequence[Literal["train", "val", "test", "bolivia"]] | None = None,
                 resample: bool = False) -> None:
        super().__init__(root)
        self.sensors = tuple(sensors)
        self.output_bands = band_names(output_bands, S2_BANDS, "dataset.layout.output_bands", "Sentinel-2 L1C")
        self.s1_bands = band_names(s1_bands, S1_BANDS, "dataset.layout.s1_bands", "Sentinel-1")
        self.resample = bool(resample)
        self.use_splits = tuple(splits or self.splits)
        self.notes: list[str] = []

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        specs = {"s1": ModalitySpec(bands=self.s1_bands, nodata=float("nan"), dtype="float32", optical=False),
                 "s2": ModalitySpec(bands=self.output_bands, nodata=0, dtype="int16", optical=True)}
        return {s: specs[s] for s in self.sensors}

    def fingerprint_params(self) -> dict[str, Any]:
        return {"name": self.name, "root": str(self.root), "sensors": list(self.sensors),
                "output_bands": list(self.output_bands), "s1_bands": list(self.s1_bands),
                "splits": list(self.use_splits), "resample": self.resample, "version": 2}

    # -- scan -------------------------------------------------------------------------------------
    def _hand_dir(self, root: Path) -> Path:
        for cand in (root / "v1.1" / "data" / "flood_events" / "HandLabeled", root / "data" / "flood_events" /
                     "HandLabeled", root / "flood_events" / "HandLabeled", root / "HandLabeled", root):
            if any((cand / f).is_dir() for f in FOLDERS["label"]):
                return cand
        raise DataError(f"no HandLabeled/LabelHand folder under {root}; dataset.root must hold "
                        "v1.1/data/flood_events/HandLabeled/{S1Hand,S2Hand,LabelHand}/.")

    def _split_dir(self, root: Path, hand: Path) -> Path:
        cands = [root / "v1.1" / "splits" / "flood_handlabeled", root / "splits" / "flood_handlabeled",
                 root / "splits", root, hand.parent.parent.parent / "splits" / "flood_handlabeled"]
        for cand in cands:
            if any((cand / f"{f}.{ext}").is_file() for f in SPLIT_FILES.values() for ext in ("csv", "txt")):
                return cand
        raise DataError(f"no split files (flood_train_data.csv ...) under {root}; dataset.root must hold "
                        "v1.1/splits/flood_handlabeled/.")

    def scan(self) -> dict[str, list[SampleRef]]:
        root = Path(self.root or ".")
        hand = self._hand_dir(root)
        split_dir = self._split_dir(root, hand)
        folders = {}
        for key, names in FOLDERS.items():
            folders[key] = next((hand / n for n in names if (hand / n).is_dir()), hand / names[0])
        out: dict[str, list[SampleRef]] = {}
        for split in self.use_splits:
            ids = self._read_split(split_dir, split)
            if ids is None:
                self.notes.append(f"split {split}: no {SPLIT_FILES[split]}.csv/.txt under {split_dir}; left out")
                continue
            out[split] = [SampleRef(chip, {k: str(self._find(folders[k], chip, k)) for k in ("label", *self.sensors)})
                          for chip in ids]
        return out

    @staticmethod
    def _chip_id(name: str) -> str:
        stem = Path(name.strip()).name.split(".")[0]
        for suffix in ("S1Hand", "S1GRDHand", "S2Hand", "S2L1CHand", "LabelHand", "JRCWaterHand", "S1OtsuLabelHand"):
            if stem.endswith("_" + suffix):
                return stem[: -len(suffix) - 1]
        return stem

    def _read_split(self, split_dir: Path, split: str) -> list[str] | None:
        base = split_dir / SPLIT_FILES[split]
        if base.with_suffix(".csv").is_file():
            with open(base.with_suffix(".csv"), newline="") as fh:
                rows = [r for r in csv.reader(fh) if r and r[0].strip()]
            return [self._chip_id(r[0]) for r in rows]
        if base.with_suffix(".txt").is_file():
            return [self._chip_id(line) for line in base.with_suffix(".txt").read_text().splitlines() if line.strip()]
        return None

    @staticmethod
    def _check_count(path: str, documented: tuple[str, ...], wanted: tuple[str, ...], sensor: str,
                     listing: str) -> None:
        """A chip without band descriptions is read in the documented order, so it must have every documented band."""
        h = raster_header(path)
        described = set(h["descriptions"]) - {None}
        if h["count"] != len(documented) and not set(wanted) <= described:
            raise DataError(f"{path}: {sensor} has {h['count']} bands but Sen1Floods11 {sensor} chips have "
                            f"{len(documented)} {listing} and the file's band descriptions do not name the bands asked "
                            "for; check the file.")

    @staticmethod
    def _find(folder: Path, chip: str, key: str) -> Path:
        exact = folder / f"{chip}_{folder.name}.tif"
        if exact.is_file():
            return exact
        found = sorted(folder.glob(f"{chip}_*.tif"))
        return found[0] if found else exact  # a missing file is reported by read(), which skips the chip

    # -- read -------------------------------------------------------------------------------------
    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        h = raster_header(ref.files["label"])
        return int(h["height"]), int(h["width"])

    def read(self, ref: SampleRef) -> Sample:
        lab_path = ref.files["label"]
        raw, header = read_raster(lab_path)
        if raw.shape[0] != 1:
            raise DataError(f"{lab_path}: a label has 1 band but this file has {raw.shape[0]}; is it a LabelHand file?")
        band = raw[0].astype(np.int32)
        bad = ~np.isin(band, (-1, 0, 1))
        if bad.any():
            values = sorted({int(v) for v in np.unique(band[bad])})[:8]
            raise DataError(f"{lab_path}: label values {values} are not -1 (no data), 0 (dry) or 1 (water); "
                            "is this a LabelHand file?")
        label = np.where(band == -1, self.ignore_index, band).astype(np.uint8)
        arrays: dict[str, np.ndarray] = {}
        grid = Grid.of(header)
        if "s1" in self.sensors:
            path = ref.files["s1"]
            self._check_count(path, S1_BANDS, self.s1_bands, "S1", "(VV, VH)")
            s1, _, _ = read_on_grid(path, grid, lab_path, what="s1", nodata=float("nan"), resample=self.resample,
                                    bands=self.s1_bands, bands_key="dataset.layout.s1_bands", names=S1_BANDS)
            arrays["s1"] = s1.astype(np.float32, copy=False)
        if "s2" in self.sensors:
            path = ref.files["s2"]
            self._check_count(path, S2_BANDS, self.output_bands, "S2", f"({' '.join(S2_BANDS)})")
            s2, _, _ = read_on_grid(path, grid, lab_path, what="s2", nodata=0, resample=self.resample,
                                    bands=self.output_bands, bands_key="dataset.layout.output_bands", names=S2_BANDS)
            if s2.dtype != np.int16:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    s2 = np.clip(np.nan_to_num(s2.astype(np.float64)), -32768, 32767).astype(np.int16)
            arrays["s2"] = s2
        crs, transform = georef(header)
        return Sample(arrays=arrays, label=label, source=lab_path, crs=crs, transform=transform)
