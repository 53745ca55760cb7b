"""The user's own GeoTIFFs: per-modality file globs, band lists, nodata, a label glob and a class table.

Configured the way TerraTorch's generic multimodal data module is: each modality is a glob (relative
to `root`) plus its band names (and optionally which of the file's bands to read, by 1-based index or
band description, so one multi-band file can feed several modalities); samples are matched across
modalities by an id taken from each file's stem with `stem_regex`; splits come from path globs,
per-split id files, or a seeded hash of the id.

Every modality and the label must lie on the reference grid (the label's, by default): the same CRS,
transform (origin and pixel size, to 1/100 of a pixel) and size (`segplat.data.raster.check_grid`).
Any other grid is refused, naming both files and the difference, unless `resample: true`, in which
case it is warped onto the reference grid (bilinear for data, nearest for labels); a modality the warp
leaves entirely no-data (no overlap) skips its sample, with the reason. Every key is checked: a typo
stops before any file is read. Raster helpers live in `segplat.data.raster`; fake data in
`segplat.data.fake.geotiff`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from annotated_types import Ge
from rasterio.warp import Resampling

from segplat.data.layouts.base import RGB, LabelValue, Layout, ModalitySpec, Sample, SampleRef, hash_split
from segplat.data.raster import (
    Grid,
    decode_colour_label,
    georef,
    grid_relation,
    norm_nodata,
    raster_header,
    read_on_grid,
    read_raster,
    warp_to_grid,
)
from segplat.errors import ConfigError, DataError
from segplat.messages import first_line, must_be, not_known
from segplat.schema import Hint, NonNegativeInt, Probability, build_section, section
from segplat.utils.plain import to_plain

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".png", ".jpg", ".bmp")


NoData = Annotated[float | Literal["file", "nan"] | None,
                   Hint("a number, .nan, null (none) or file (each file's own nodata tag)")]


@section
@dataclass(frozen=True)
class ModalityConfig:
    """`dataset.layout.modalities.NAME`: where one modality's files are and how to read them."""

    glob: str | None = None
    folder: str | None = None  # with `pattern`: another way to write `glob`
    pattern: str | None = None
    bands: tuple[str | int, ...] = ()  # names of the stored bands
    # which file bands: 1-based indexes or band descriptions
    source_bands: tuple[Annotated[int, Ge(1)] | str, ...] | None = None
    nodata: NoData = "file"
    dtype: str | None = None  # null: the dtype of the first readable file
    optical: bool = True


@section
@dataclass(frozen=True)
class LabelConfig:
    """`dataset.layout.label`: the label files and how to decode them."""

    glob: str | None = None
    folder: str | None = None
    pattern: str | None = None
    nodata: NoData = None  # the label value meaning "no label"; null or "file": the file's nodata tag
    band: Annotated[int, Ge(1)] | str = 1  # class-value labels: which band (1-based index or description)
    colour: bool = False  # RGB colour-coded labels decoded with the palette
    tolerance: NonNegativeInt = 0
    ignore_colours: tuple[RGB, ...] = ()


def _globbed(glob: str | None, folder: str | None, pattern: str | None) -> str | None:
    """`folder` + `pattern` (default *.tif) is another way to write `glob`."""
    if not glob and folder:
        return f"{str(folder).rstrip('/')}/{pattern or '*.tif'}"
    return glob


def _modality_configs(modalities: Mapping[str, Any] | None) -> dict[str, ModalityConfig]:
    """`dataset.layout.modalities` as sections, `glob` resolved; the rules between a modality's keys."""
    out: dict[str, ModalityConfig] = {}
    for name, m in (to_plain(modalities) or {}).items():
        cfg = build_section(ModalityConfig, m)
        glob = _globbed(cfg.glob, cfg.folder, cfg.pattern)
        bands = tuple(str(b) for b in cfg.bands)
        if not glob or not bands:
            raise ConfigError(f"dataset.layout.modalities.{name} needs `glob` (relative to dataset.root) and "
                              "`bands` (a list of band names).")
        if cfg.source_bands is not None and len(cfg.source_bands) != len(bands):
            raise ConfigError(must_be(f"dataset.layout.modalities.{name}.source_bands", list(cfg.source_bands),
                                      f"one 1-based band index or band description per name in bands ({len(bands)})"))
        out[name] = dataclasses.replace(cfg, glob=glob, folder=None, pattern=None, bands=bands)
    if not out:
        raise ConfigError("dataset.layout.modalities is empty; list at least one modality with a glob and bands.")
    return out


def _label_config(label: Mapping[str, Any] | None, value_map: bool) -> LabelConfig:
    """`dataset.layout.label` as a section, `glob` resolved; colour labels take no band, value map or the like."""
    lab = build_section(LabelConfig, label)
    if lab.colour and (lab.band != 1 or value_map):
        raise ConfigError("dataset.layout.label.colour=true reads bands 1-3 as RGB and decodes them with the "
                          "palette, so label.band and value_map do not apply; remove them or set colour=false.")
    if not lab.colour and (lab.tolerance or lab.ignore_colours):
        raise ConfigError("dataset.layout.label.tolerance and ignore_colours apply to colour labels only; remove "
                          "them or set label.colour=true.")
    return dataclasses.replace(lab, glob=_globbed(lab.glob, lab.folder, lab.pattern), folder=None, pattern=None,
                               ignore_colours=tuple(tuple(c) for c in lab.ignore_colours))


class GeoTiffLayout(Layout):
    """Any co-registered set of GeoTIFFs described in the config (see conf/dataset/geotiff.yaml)."""

    name = "geotiff"

    def __init__(
        self,
        root: str | None = None,
        modalities: Mapping[str, ModalityConfig] | None = None,
        label: LabelConfig | None = None,
        classes: Sequence[str] = (),
        palette: Sequence[RGB] | None = None,
        value_map: Mapping[int, LabelValue | Literal["ignore"]] | None = None,
        ignore_index: LabelValue = 255,
        stem_regex: str = r"^(?P<id>.+)$",
        splits: Mapping[str, str] | None = None,
        split_files: Mapping[str, str] | None = None,
        val_fraction: Probability = 0.2,
        seed: int = 0,
        resample: bool = False,
        reference: str = "label",
    ) -> None:
        super().__init__(root)
        self.modality_cfg = _modality_configs(modalities)
        self.label_cfg = _label_config(label, bool(value_map))
        self.classes = tuple(to_plain(classes) or ())
        if not self.classes:
            raise ConfigError("dataset.layout.classes is empty; list the class names in label-index order.")
        self.palette = tuple(tuple(int(v) for v in c) for c in to_plain(palette) or _default_palette(len(self.classes)))
        if len(self.palette) != len(self.classes):
            raise ConfigError(f"dataset.layout.palette has {len(self.palette)} colours for {len(self.classes)} "
                              "classes; give one RGB triple per class or leave it null.")
        self.ignore_index = int(ignore_index)
        self.value_map = {int(k): (self.ignore_index if v == "ignore" else int(v))
                          for k, v in (to_plain(value_map) or {}).items()}
        try:
            self.stem_regex = re.compile(stem_regex)
        except re.error as err:
            raise ConfigError(must_be("dataset.layout.stem_regex", stem_regex, "a valid regular expression",
                                      first_line(err))) from err
        self.split_globs = to_plain(splits) or {}
        self.split_files = to_plain(split_files) or {}
        if self.split_globs and self.split_files:
            raise ConfigError("dataset.layout.splits and dataset.layout.split_files are both set; keep one of them "
                              "(the other would be ignored).")
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.resample = bool(resample)
        self.reference = reference
        if reference != "label" and reference not in self.modality_cfg:
            raise ConfigError(not_known("dataset.layout.reference", reference, ["label", *self.modality_cfg],
                                        "the grid everything lands on: the label's or a modality's"))
        self.splits = tuple(self.split_globs or self.split_files or ("train", "val"))
        self._specs: dict[str, ModalitySpec] | None = None
        self._files: dict[str, list[Path]] = {}
        self.notes: list[str] = []

    # -- specs ------------------------------------------------------------------------------------
    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        if self._specs is None:
            specs = {}
            for name, m in self.modality_cfg.items():
                dtype, nodata = m.dtype, m.nodata
                if dtype is None or nodata == "file":
                    header = self._first_readable_header(name)
                    dtype = dtype or header["dtype"]
                    if nodata == "file":
                        nodata = header["nodata"]
                specs[name] = ModalitySpec(bands=m.bands, nodata=norm_nodata(nodata), dtype=str(np.dtype(dtype)),
                                           optical=m.optical)
            self._specs = specs
        return self._specs

    def _first_readable_header(self, name: str) -> dict[str, Any]:
        """The header of the first file of `name` that opens: an unreadable first file only skips its own sample."""
        files = self._files.get(name) or self._glob(str(self.modality_cfg[name].glob))
        errors = []
        for path in files:
            try:
                return raster_header(path)
            except DataError as err:
                errors.append(err)
        if not files:
            return {"dtype": "float32", "nodata": None}  # scan() reports the empty glob
        raise DataError(f"none of the {len(files)} files of modality {name} can be read (the first: {errors[0]}), "
                        f"so its dtype and nodata are unknown; fix the files or set dataset.layout.modalities.{name}."
                        "dtype and nodata.")

    def fingerprint_params(self) -> dict[str, Any]:
        return {"name": self.name, "root": str(self.root),
                "modalities": {k: asdict(v) for k, v in self.modality_cfg.items()},
                "label": asdict(self.label_cfg), "classes": list(self.classes), "value_map": self.value_map,
                "stem_regex": self.stem_regex.pattern, "splits": self.split_globs, "split_files": self.split_files,
                "val_fraction": self.val_fraction, "seed": self.seed, "resample": self.resample,
                "reference": self.reference, "version": 2}

    # -- scan -------------------------------------------------------------------------------------
    def _glob(self, pattern: str) -> list[Path]:
        root = Path(self.root or ".")
        return sorted(p for p in root.glob(pattern) if p.is_file())

    def _sample_id(self, path: Path) -> str | None:
        stem = path.stem if path.suffix.lower() in RASTER_SUFFIXES else path.name
        m = self.stem_regex.search(stem)
        if m is None:
            return None
        if "id" in m.groupdict():
            return m.group("id")
        return m.group(1) if m.groups() else m.group(0)

    def _index(self, key: str, pattern: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in self._glob(pattern):
            sid = self._sample_id(p)
            if sid is None:
                continue
            if sid in out:
                raise DataError(f"{p} and {out[sid]} both give sample id {sid!r} for {key}; make "
                                "dataset.layout.stem_regex capture a unique id per file.")
            out[sid] = p
        return out

    def scan(self) -> dict[str, list[SampleRef]]:
        root = Path(self.root or ".")
        files: dict[str, dict[str, Path]] = {}
        keys = {name: str(m.glob) for name, m in self.modality_cfg.items()}
        if self.label_cfg.glob:
            keys["label"] = self.label_cfg.glob
        for key, pattern in keys.items():
            found = self._index(key, pattern)
            if not found:
                raise DataError(f"no files match {key} glob {pattern!r} under {root} (with stem_regex "
                                f"{self.stem_regex.pattern!r}); fix dataset.layout.modalities/label or dataset.root.")
            if key != "label":
                self._files[key] = list(found.values())
            for sid, p in found.items():
                files.setdefault(sid, {})[key] = p
        ids = sorted(files)
        assign = self._assign_splits(ids, files, root)
        out: dict[str, list[SampleRef]] = {s: [] for s in self.splits}
        for sid in ids:
            split = assign.get(sid)
            if split is None:
                continue
            refs = {k: str(files[sid].get(k, "")) for k in keys}
            out.setdefault(split, []).append(SampleRef(sid, refs))
        unassigned = sum(1 for sid in ids if sid not in assign)
        if unassigned:
            self.notes.append(f"{unassigned} samples match no split and were left out")
        return out

    def _assign_splits(self, ids: list[str], files: dict[str, dict[str, Path]], root: Path) -> dict[str, str]:
        if self.split_files:
            assign: dict[str, str] = {}
            for split, fname in self.split_files.items():
                path = Path(fname) if Path(fname).is_absolute() else root / fname
                if not path.is_file():
                    raise DataError(f"split file {path} for split {split!r} is missing; fix "
                                    "dataset.layout.split_files.")
                for line in path.read_text().splitlines():
                    sid = line.strip().split(",")[0]
                    if sid and not sid.startswith("#"):
                        sid = self._sample_id(Path(sid)) or sid
                        assign[sid] = split
            missing = [s for s in assign if s not in files]
            if missing:
                self.notes.append(f"{len(missing)} ids in the split files have no files (e.g. {missing[0]})")
            return assign
        if self.split_globs:
            assign = {}
            for sid in ids:
                rels = [str(p.relative_to(root)) for p in files[sid].values()]
                for split, pattern in self.split_globs.items():
                    if any(fnmatch.fnmatch(r, pattern) for r in rels):
                        assign[sid] = split
                        break
            return assign
        return hash_split(ids, self.val_fraction, self.seed)

    # -- read -------------------------------------------------------------------------------------
    def _reference_key(self, ref: SampleRef) -> str:
        if self.reference != "label" or ref.files.get("label"):
            return self.reference
        return next(iter(self.modality_cfg))

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        key = self._reference_key(ref)
        path = ref.files.get(key) or next((p for p in ref.files.values() if p), "")
        if not path:
            raise DataError(f"sample {ref.id}: no file for {key}; every sample needs one.")
        h = raster_header(path)
        return int(h["height"]), int(h["width"])

    def read(self, ref: SampleRef) -> Sample:
        for key, path in ref.files.items():
            if not path:
                present = next(p for p in ref.files.values() if p)
                glob = self.modality_cfg[key].glob if key in self.modality_cfg else self.label_cfg.glob
                raise DataError(f"{present}: sample {ref.id} has no {key} file (glob {glob!r}); add it or remove the "
                                "sample's other files.")
        ref_key = self._reference_key(ref)
        ref_path = ref.files[ref_key]
        ref_grid = Grid.of(raster_header(ref_path))
        arrays: dict[str, np.ndarray] = {}
        for name, spec in self.modalities.items():
            path = ref.files[name]
            data, _, _ = read_on_grid(
                path, ref_grid, ref_path, what=name, nodata=spec.nodata,
                resample=self.resample and name != ref_key, bands=self.modality_cfg[name].source_bands,
                bands_key=f"dataset.layout.modalities.{name}.source_bands")
            if data.shape[0] != len(spec.bands):
                raise DataError(f"{path}: {name} has {data.shape[0]} bands but dataset.layout.modalities.{name}.bands "
                                f"lists {len(spec.bands)} ({', '.join(spec.bands)}); fix the file or the band list, "
                                f"or pick bands with dataset.layout.modalities.{name}.source_bands.")
            arrays[name] = data.astype(spec.dtype, copy=False)
        if "label" in ref.files:
            lab_path = ref.files["label"]
            select = [1, 2, 3] if self.label_cfg.colour else [self.label_cfg.band]
            raw, header = read_raster(lab_path, select, "dataset.layout.label.band")
            label = self._decode_label(raw, header, lab_path)
            grid = Grid.of(header)
            if ref_key != "label" and grid_relation(grid, lab_path, ref_grid, ref_path, self.resample) == "warp":
                warped, covered = warp_to_grid(label[None], grid, ref_grid, self.ignore_index, Resampling.nearest)
                label = np.where(covered, warped[0], self.ignore_index).astype(np.uint8)
        else:
            label = np.full((ref_grid.height, ref_grid.width), self.ignore_index, np.uint8)
        crs, transform = georef(raster_header(ref_path))
        return Sample(arrays=arrays, label=label, source=str(ref_path), crs=crs, transform=transform)

    def _decode_label(self, raw: np.ndarray, header: Mapping[str, Any], path: str) -> np.ndarray:
        if self.label_cfg.colour:
            label, n = decode_colour_label(np.moveaxis(raw[:3], 0, -1), self.palette, path,
                                           ignore_colours=self.label_cfg.ignore_colours,
                                           ignore_index=self.ignore_index, tolerance=int(self.label_cfg.tolerance))
            if n:
                self.notes.append(f"{path}: {n} off-palette label pixels mapped to the nearest class colour")
            return label
        band = raw[0]
        if np.issubdtype(band.dtype, np.floating):
            if not np.all(np.isfinite(band) | np.isnan(band)) or np.any(band[np.isfinite(band)] % 1):
                raise DataError(f"{path}: label values are not whole numbers; the label must hold class values.")
            band = np.where(np.isnan(band), -(2**31), band)
        band = band.astype(np.int64)
        out = np.full(band.shape, self.ignore_index, np.uint8)
        nodata = self.label_cfg.nodata
        if nodata is None or nodata == "file":  # null means the file's own nodata tag
            nodata = header.get("nodata")
        ignore = band == -(2**31)
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            ignore |= band == int(nodata)
        if self.value_map:
            known = ignore.copy()
            for raw_v, cls in self.value_map.items():
                hit = band == raw_v
                out[hit] = cls
                known |= hit
            if not known.all():
                values = sorted({int(v) for v in np.unique(band[~known])})[:8]
                raise DataError(f"{path}: label values {values} are not in dataset.layout.value_map "
                                f"{self.value_map}; add them (use 'ignore' to drop a value).")
        else:
            bad = ~ignore & ((band < 0) | (band >= len(self.classes))) & (band != self.ignore_index)
            if bad.any():
                values = sorted({int(v) for v in np.unique(band[bad])})[:8]
                raise DataError(f"{path}: label values {values} are outside the {len(self.classes)} classes and the "
                                f"ignore index {self.ignore_index}; fix the file or set dataset.layout.value_map.")
            keep = ~ignore
            out[keep] = band[keep].astype(np.uint8)
        return out


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(12345)
    base = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    while len(base) < n:
        base.append(tuple(int(v) for v in rng.integers(0, 256, 3)))
    return base[:n]
