"""s1s2_series: Sentinel-1 + Sentinel-2 time series per patch, in the PASTIS-R layout.

On disk (docs/datasets.md): `DATA_S2/S2_{ID}.npy` (T x 10 x H x W int16, bands B2 B3 B4 B5
B6 B7 B8 B8A B11 B12), `DATA_S1A/S1A_{ID}.npy` (and `DATA_S1D/`, T x 3 x H x W: VV, VH, VV/VH),
`ANNOTATIONS/TARGET_{ID}.npy` (class in channel 0: 0 background, 1-18 crops, 19 void) and
`metadata.geojson` with `ID_PATCH`, `Fold` (1-5) and per-sensor date dicts `dates-S2`,
`dates-S1A`, `dates-S1D` (`{"0": 20180924, ...}`).

Converted once into the store as two temporal modalities `s2` and `s1`, each (T, C, H, W) padded
to `max_time` with `<m>_dates` holding day offsets from `reference_date` (-1 on padding). Why the
conversion drops dates: a date whose every pixel is no-data carries nothing but still costs the
temporal encoder a step and skews its attention, so it is removed before padding. T differs per
sensor and sample; `max_time` (null = the largest count in metadata.geojson) fixes the stored
length, and longer series are subsampled evenly (logged) rather than refused. `bands` picks bands per
sensor by name or 1-based index.

Grids: the .npy stacks carry no georeferencing; S2, S1 and the label of a patch are paired only when
their frames have the label's size (PASTIS-R resamples S1 onto the S2 grid), otherwise refused. A patch's CRS and
transform come from its footprint in metadata.geojson (the file's `crs` member and the polygon's bounds over the
label's size); a file without a CRS, or a footprint that is not an axis-aligned rectangle, leaves the patch
without georeference (counted in the store's notes), never with an invented one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from annotated_types import MinLen

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, band_names
from segplat.errors import ConfigError, DataError
from segplat.messages import must_be
from segplat.schema import Hint, PositiveInt, build_section, section

log = logging.getLogger(__name__)

S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
S1_BANDS = ("VV", "VH", "VV_VH_ratio")
CLASSES = ("background", "meadow", "soft_winter_wheat", "corn", "winter_barley", "winter_rapeseed",
           "spring_barley", "sunflower", "grapevine", "beet", "winter_triticale", "winter_durum_wheat",
           "fruits_vegetables_flowers", "potatoes", "leguminous_fodder", "soybeans", "orchard", "mixed_cereal",
           "sorghum")
VOID_CLASS = 19
PALETTE = ((0, 0, 0), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
           (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
           (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
           (23, 190, 207))


def _parse_date(value: Any, where: str) -> dt.date:
    try:
        s = str(int(value))
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: date {value!r} is not YYYYMMDD; fix metadata.geojson.") from err


def _is_nodata(frame: np.ndarray, nodata: float | None) -> np.ndarray:
    """Per-pixel no-data of a (C, H, W) or (T, C, H, W) stack (NaN always counts for floats)."""
    bad = np.isnan(frame) if np.issubdtype(frame.dtype, np.floating) else np.zeros(frame.shape, bool)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        bad |= frame == nodata
    return bad



def geojson_crs(doc: Mapping[str, Any], path: Path) -> str | None:
    """The CRS a GeoJSON file names in its (2008-spec) `crs` member, e.g. PASTIS-R's urn:ogc:def:crs:EPSG::2154, as
    an authority string; None when it names none (RFC 7946's implied lon/lat cannot place a metric patch)."""
    member = doc.get("crs")
    if not member:
        return None
    name = (member.get("properties") or {}).get("name") if isinstance(member, Mapping) else None
    if not name:
        raise DataError(f"{path}: its crs member {member!r} has no properties.name; fix metadata.geojson.")
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        crs = CRS.from_user_input(str(name))
    except CRSError as err:
        raise DataError(f"{path}: CRS {name!r} is not known to PROJ; fix metadata.geojson.") from err
    return crs.to_string()


def rectangle_bounds(geometry: Mapping[str, Any] | None) -> tuple[float, float, float, float] | None:
    """(west, south, east, north) of a Polygon footprint that is an axis-aligned rectangle, else None."""
    if not isinstance(geometry, Mapping) or geometry.get("type") != "Polygon" or not geometry.get("coordinates"):
        return None
    points = np.asarray(geometry["coordinates"][0], dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 4:
        return None
    west, south = points[:, 0].min(), points[:, 1].min()
    east, north = points[:, 0].max(), points[:, 1].max()
    tol = 1e-6 * max(east - west, north - south)
    on_edge = (np.minimum(abs(points[:, 0] - west), abs(points[:, 0] - east)) <= tol) & \
              (np.minimum(abs(points[:, 1] - south), abs(points[:, 1] - north)) <= tol)
    if east - west <= 0 or north - south <= 0 or not on_edge.all():
        return None
    return float(west), float(south), float(east), float(north)

@section
class SensorDates:
    """`dataset.layout.max_time` per sensor (null: the largest count in metadata.geojson)."""

    s2: PositiveInt | None = None
    s1: PositiveInt | None = None


@section
class SensorNodata:
    """`dataset.layout.nodata` per sensor."""

    s2: float | None = 0
    s1: float | None = float("nan")


@section
class SensorBands:
    """`dataset.layout.bands` per sensor: band names or 1-based indexes (null: all)."""

    s2: Sequence[str | PositiveInt] | None = None
    s1: Sequence[str | PositiveInt] | None = None


class S1S2SeriesLayout(Layout):
    """PASTIS-R-style reader; modalities `s2` and `s1`, both temporal."""

    name = "s1s2_series"
    classes = CLASSES
    palette = PALETTE
    ignore_index = 255
    splits = ("train", "val", "test")

    def __init__(self, root: str | None = None, folds: Mapping[str, Sequence[PositiveInt]] | None = None,
                 s1_orbit: Annotated[Literal["S1A", "S1D"], Hint("S1A ascending, S1D descending")] = "S1A",
                 sensors: Annotated[Sequence[Literal["s2", "s1"]], MinLen(1)] = ("s2", "s1"),
                 max_time: Annotated[PositiveInt | SensorDates | None,
                                     Hint("a number of dates for every sensor, or {s2: N, s1: M}")] = None,
                 reference_date: str = "2018-09-01", nodata: SensorNodata | None = None,
                 drop_nodata_dates: bool = True, bands: SensorBands | None = None) -> None:
        super().__init__(root)
        picks = build_section(SensorBands, bands)
        self.bands = {"s2": band_names(picks.s2, S2_BANDS, "dataset.layout.bands.s2", "PASTIS-R S2"),
                      "s1": band_names(picks.s1, S1_BANDS, "dataset.layout.bands.s1", "PASTIS-R S1")}
        folds = folds if folds is not None else {"train": [1, 2, 3], "val": [4], "test": [5]}
        self.folds = {str(k): [int(f) for f in v] for k, v in dict(folds).items()}
        seen: dict[int, str] = {}
        for split, fs in self.folds.items():
            for f in fs:
                if f in seen:
                    raise ConfigError(f"dataset.layout.folds puts fold {f} in both {seen[f]} and {split}; "
                                      "give each fold one split.")
                seen[f] = split
        self.s1_orbit = s1_orbit
        self.sensors = [str(s) for s in sensors]
        dates = SensorDates(max_time, max_time) if isinstance(max_time, int) else build_section(SensorDates, max_time)
        self._max_time_cfg = {"s2": dates.s2, "s1": dates.s1}
        try:
            self.reference = dt.date.fromisoformat(str(reference_date))
        except ValueError as err:
            raise ConfigError(must_be("dataset.layout.reference_date", reference_date, "a date YYYY-MM-DD")) from err
        nd = build_section(SensorNodata, nodata)
        self.nodata: dict[str, float | None] = {k: (None if v is None else float(v))
                                                for k, v in (("s2", nd.s2), ("s1", nd.s1))}
        self.drop_nodata_dates = bool(drop_nodata_dates)
        self._meta: dict[str, dict[str, Any]] | None = None
        self._bounds: dict[str, tuple[float, float, float, float] | None] = {}
        self.crs: str | None = None
        self.dropped_dates = 0
        self.subsampled = 0
        self.not_georeferenced = 0

    @property
    def notes(self) -> list[str]:
        """Counts prepare records in the store attrs: dates dropped as all no-data, series subsampled."""
        out = []
        if self.dropped_dates:
            out.append(f"{self.dropped_dates} all-no-data date(s) dropped")
        if self.subsampled:
            out.append(f"{self.subsampled} series longer than max_time subsampled evenly")
        if self.not_georeferenced:
            why = "metadata.geojson names no CRS" if self.crs is None else "footprints not axis-aligned rectangles"
            out.append(f"{self.not_georeferenced} patch(es) without georeference ({why})")
        return out

    # -- metadata -------------------------------------------------------------------------------
    def _folder(self, sensor: str) -> tuple[str, str]:
        return ("DATA_S2", "S2") if sensor == "s2" else (f"DATA_{self.s1_orbit}", self.s1_orbit)

    def metadata(self) -> dict[str, dict[str, Any]]:
        """ID_PATCH -> feature properties, read once from metadata.geojson."""
        if self._meta is not None:
            return self._meta
        if self.root is None:
            raise ConfigError("dataset.root is not set; point it at the folder holding DATA_S2/ DATA_S1A/ "
                              "ANNOTATIONS/ metadata.geojson.")
        path = Path(self.root) / "metadata.geojson"
        if not path.is_file():
            raise DataError(f"{path} is missing; s1s2_series needs the PASTIS-R metadata.geojson (ID_PATCH, Fold, "
                            "dates-S2, dates-S1A).")
        try:
            doc = json.loads(path.read_text())
            feats = doc["features"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not a GeoJSON FeatureCollection ({err}); re-download it.") from err
        meta = {}
        self.crs = geojson_crs(doc, path)
        for k, feat in enumerate(feats):
            props = feat.get("properties") or {}
            if "ID_PATCH" not in props or "Fold" not in props:
                raise DataError(f"{path}: feature {k} lacks ID_PATCH or Fold; the file is not PASTIS-R metadata.")
            meta[str(props["ID_PATCH"])] = props
            self._bounds[str(props["ID_PATCH"])] = rectangle_bounds(feat.get("geometry"))
        self._meta = meta
        return meta

    def georeference(self, patch: str, height: int, width: int) -> tuple[str | None, tuple[float, ...] | None]:
        """(CRS, affine transform) of a patch from its footprint in metadata.geojson (PASTIS-R: EPSG:2154, 128 px
        of 10 m); (None, None), counted in the store's notes, when the file names no CRS or the footprint is not
        an axis-aligned rectangle, so that nothing downstream invents a location."""
        bounds = self._bounds.get(patch)
        if self.crs is None or bounds is None:
            self.not_georeferenced += 1
            return None, None
        west, south, east, north = bounds
        return self.crs, ((east - west) / width, 0.0, west, 0.0, -(north - south) / height, north)

    def _dates(self, props: Mapping[str, Any], sensor: str, where: str) -> list[dt.date]:
        key = "dates-S2" if sensor == "s2" else f"dates-{self.s1_orbit}"
        raw = props.get(key)
        if isinstance(raw, str):
            raw = json.loads(raw)
        if not isinstance(raw, Mapping):
            raise DataError(f"{where}: patch {props.get('ID_PATCH')} has no {key} date dict in metadata.geojson; add "
                            f'one ("{key}": {{"0": 20180924, ...}}, one date per frame) or leave '
                            f"{'s2' if sensor == 's2' else 's1'} out of dataset.layout.sensors.")
        return [_parse_date(raw[k], where) for k in sorted(raw, key=lambda x: int(x))]

    def max_time(self, sensor: str) -> int:
        cfg = self._max_time_cfg.get(sensor)
        if cfg is not None:
            return cfg
        where = str(Path(self.root or ".") / "metadata.geojson")
        counts = [len(self._dates(p, sensor, where)) for p in self.metadata().values()]
        return max(counts) if counts else 1

    # -- constants ------------------------------------------------------------------------------
    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        specs = {
            "s2": ModalitySpec(bands=self.bands["s2"], nodata=self.nodata["s2"], dtype="int16", optical=True,
                               temporal=True, max_time=self.max_time("s2")),
            "s1": ModalitySpec(bands=self.bands["s1"], nodata=self.nodata["s1"], dtype="float32", optical=False,
                               temporal=True, max_time=self.max_time("s1")),
        }
        return {s: specs[s] for s in self.sensors}

    def fingerprint_params(self) -> dict[str, Any]:
        return {**super().fingerprint_params(), "folds": self.folds, "s1_orbit": self.s1_orbit,
                "sensors": self.sensors, "max_time": {s: self.max_time(s) for s in self.sensors},
                "reference": self.reference.isoformat(), "nodata": {k: str(v) for k, v in self.nodata.items()},
                "drop": self.drop_nodata_dates, "bands": self.bands, "version": 3}  # 3: georeference

    # -- scan / read ----------------------------------------------------------------------------
    def scan(self) -> dict[str, list[SampleRef]]:
        root = Path(self.root) if self.root else None
        meta = self.metadata()
        assert root is not None
        for sensor in self.sensors:
            folder = root / self._folder(sensor)[0]
            if not folder.is_dir():
                raise DataError(f"{folder} is missing; restore it or drop {sensor} from dataset.layout.sensors.")
        if not (root / "ANNOTATIONS").is_dir():
            raise DataError(f"{root / 'ANNOTATIONS'} is missing; s1s2_series needs TARGET_{{ID}}.npy labels.")
        fold_to_split = {f: s for s, fs in self.folds.items() for f in fs}
        out: dict[str, list[SampleRef]] = {s: [] for s in self.folds}
        for pid in sorted(meta, key=lambda x: (len(x), x)):
            split = fold_to_split.get(int(meta[pid]["Fold"]))
            if split is None:
                continue
            files = {"label": str(root / "ANNOTATIONS" / f"TARGET_{pid}.npy")}
            for sensor in self.sensors:
                folder, prefix = self._folder(sensor)
                files[sensor] = str(root / folder / f"{prefix}_{pid}.npy")
            out[split].append(SampleRef(pid, files))
        return out

    def _load(self, path: str, ref: SampleRef, what: str) -> np.ndarray:
        if not Path(path).is_file():
            raise DataError(f"{path}: the {what} of patch {ref.id} is missing; restore it or remove the patch from "
                            "metadata.geojson.")
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot be read as a .npy array ({err}); re-download the file.") from err

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        arr = np.load(ref.files["label"], mmap_mode="r") if Path(ref.files["label"]).is_file() else None
        if arr is None:
            raise DataError(f"{ref.files['label']}: the label of patch {ref.id} is missing; restore it.")
        return tuple(arr.shape[-2:])  # type: ignore[return-value]

    def read(self, ref: SampleRef) -> Sample:
        target = self._load(ref.files["label"], ref, "label")
        if target.ndim == 3:
            target = target[0]
        if target.ndim != 2:
            raise DataError(f"{ref.files['label']}: label has shape {target.shape}; expected (3, H, W) or (H, W).")
        if target.min() < 0 or target.max() > VOID_CLASS:
            raise DataError(f"{ref.files['label']}: class values {int(target.min())}..{int(target.max())} are outside "
                            f"0..{VOID_CLASS}; the file is not a PASTIS-R target.")
        label = target.astype(np.uint8)
        label[label == VOID_CLASS] = self.ignore_index
        props = self.metadata()[ref.id]
        arrays, dates = {}, {}
        specs = self.modalities
        for sensor in self.sensors:
            spec = specs[sensor]
            path = ref.files[sensor]
            stack = self._load(path, ref, f"{sensor} series")
            documented = S2_BANDS if sensor == "s2" else S1_BANDS
            if stack.ndim != 4 or stack.shape[1] != len(documented):
                raise DataError(f"{path}: shape {stack.shape} is not (T, {len(documented)}, H, W) "
                                f"({', '.join(documented)}); the file is not a PASTIS-R {sensor.upper()} series.")
            if spec.bands != documented:
                stack = stack[:, [documented.index(b) for b in spec.bands]]
            if stack.shape[-2:] != label.shape:
                raise DataError(f"{path}: frames are {stack.shape[-1]}x{stack.shape[-2]} but the label is "
                                f"{label.shape[1]}x{label.shape[0]}; the modalities' sizes disagree.")
            if not np.can_cast(stack.dtype, spec.dtype, casting="same_kind"):
                raise DataError(f"{path}: dtype {stack.dtype} cannot hold {sensor} as {spec.dtype}; check the file.")
            when = self._dates(props, sensor, path)
            if len(when) != stack.shape[0]:
                raise DataError(f"{path}: {stack.shape[0]} frames but metadata.geojson lists {len(when)} dates for "
                                f"patch {ref.id}; the file and the metadata disagree.")
            offsets = np.array([(d - self.reference).days for d in when], dtype=np.int64)
            order = np.argsort(offsets, kind="stable")
            stack, offsets = stack[order], offsets[order]
            if self.drop_nodata_dates:
                keep = ~_is_nodata(stack, spec.nodata).reshape(stack.shape[0], -1).all(axis=1)
                self.dropped_dates += int((~keep).sum())
                stack, offsets = stack[keep], offsets[keep]
            if (offsets < 0).any():
                raise DataError(f"{path}: dates before dataset.layout.reference_date={self.reference} would be "
                                "negative offsets (-1 marks padding); set an earlier reference_date.")
            if stack.shape[0] > spec.max_time:
                pick = np.unique(np.linspace(0, stack.shape[0] - 1, spec.max_time).round().astype(int))
                self.subsampled += 1
                log.warning("%s: %d dates > max_time %d for %s, kept %d evenly spaced", path, stack.shape[0],
                            spec.max_time, sensor, len(pick))
                stack, offsets = stack[pick], offsets[pick]
            arrays[sensor] = np.ascontiguousarray(stack.astype(spec.dtype, copy=False))
            dates[sensor] = offsets.astype(np.int32)
        crs, transform = self.georeference(ref.id, *label.shape)
        return Sample(arrays=arrays, label=label, source=ref.files["label"], dates=dates, crs=crs,
                      transform=transform)
