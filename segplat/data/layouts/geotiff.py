"""The user's own GeoTIFFs: per-modality file globs, band lists, nodata, a label glob and a class table.

Configured the way TerraTorch's generic multimodal data module is: each modality is a glob (relative
to `root`) plus its band names; samples are matched across modalities by an id taken from each
file's stem with `stem_regex`; splits come from path globs, per-split id files, or a seeded
hash of the id. Every modality must lie on the reference grid (the label's, by default): a file
with another CRS or resolution is refused, naming both files, unless `resample: true`, in which
case it is warped onto the reference grid (bilinear for data, nearest for labels).
The raster helpers it uses live in `segplat.data.raster`; its fake data in `segplat.data.fake.geotiff`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.warp import Resampling, reproject

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef, hash_split
from segplat.data.raster import decode_colour_label, georef, norm_nodata, raster_header, read_raster
from segplat.errors import ConfigError, DataError

log = logging.getLogger(__name__)

GRID_TOLERANCE = 1e-6  # relative difference in pixel size still counted as the same resolution


# -- config helpers ------------------------------------------------------------------------------------
def plain(obj: Any) -> Any:
    """OmegaConf containers to plain Python (layouts get DictConfig nodes with `_recursive_: false`)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


# -- the generic layout ---------------------------------------------------------------------------------
class GeoTiffLayout(Layout):
    """Any co-registered set of GeoTIFFs described in the config (see conf/dataset/geotiff.yaml)."""

    name = "geotiff"

    def __init__(
        self,
        root: str | None = None,
        modalities: Mapping[str, Mapping[str, Any]] | None = None,
        label: Mapping[str, Any] | None = None,
        classes: Sequence[str] = (),
        palette: Sequence[Sequence[int]] | None = None,
        value_map: Mapping[Any, Any] | None = None,
        ignore_index: int = 255,
        stem_regex: str = r"^(?P<id>.+)$",
        splits: Mapping[str, str] | None = None,
        split_files: Mapping[str, str] | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        resample: bool = False,
        reference: str = "label",
    ) -> None:
        super().__init__(root)
        self.modality_cfg = {k: _with_glob(v) for k, v in (plain(modalities) or {}).items()}
        if not self.modality_cfg:
            raise ConfigError("dataset.layout.modalities is empty; list at least one modality with a glob and bands.")
        for name, m in self.modality_cfg.items():
            if not m.get("glob") or not m.get("bands"):
                raise ConfigError(f"dataset.layout.modalities.{name} needs `glob` (relative to dataset.root) and "
                                  "`bands` (a list of band names).")
        self.label_cfg = _with_glob(plain(label) or {})
        self.classes = tuple(plain(classes) or ())
        if not self.classes:
            raise ConfigError("dataset.layout.classes is empty; list the class names in label-index order.")
        self.palette = tuple(tuple(int(v) for v in c) for c in (plain(palette) or _default_palette(len(self.classes))))
        if len(self.palette) != len(self.classes):
            raise ConfigError(f"dataset.layout.palette has {len(self.palette)} colours for {len(self.classes)} "
                              "classes; give one RGB triple per class or leave it null.")
        self.ignore_index = int(ignore_index)
        self.value_map = {int(k): (self.ignore_index if str(v) == "ignore" else int(v))
                          for k, v in (plain(value_map) or {}).items()}
        try:
            self.stem_regex = re.compile(stem_regex)
        except re.error as err:
            raise ConfigError(f"dataset.layout.stem_regex={stem_regex!r} is not a valid regex ({err}).") from err
        self.split_globs = plain(splits) or {}
        self.split_files = plain(split_files) or {}
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.resample = bool(resample)
        self.reference = reference
        if reference != "label" and reference not in self.modality_cfg:
            raise ConfigError(f"dataset.layout.reference={reference!r} must be 'label' or one of the modalities "
                              f"{list(self.modality_cfg)}.")
        self.splits = tuple(self.split_globs or self.split_files or ("train", "val"))
        self._specs: dict[str, ModalitySpec] | None = None
        self._first_file: dict[str, Path] = {}
        self.notes: list[str] = []

    # -- specs ------------------------------------------------------------------------------------
    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        if self._specs is None:
            specs = {}
            for name, m in self.modality_cfg.items():
                dtype, nodata = m.get("dtype"), m.get("nodata", "file")
                if dtype is None or nodata == "file":
                    first = self._first_file.get(name) or next(iter(self._glob(m["glob"])), None)
                    header = raster_header(first) if first is not None else {"dtype": "float32", "nodata": None}
                    dtype = dtype or header["dtype"]
                    if nodata == "file":
                        nodata = header["nodata"]
                specs[name] = ModalitySpec(bands=tuple(m["bands"]), nodata=norm_nodata(nodata),
                                           dtype=str(np.dtype(dtype)), optical=bool(m.get("optical", True)))
            self._specs = specs
        return self._specs

    def fingerprint_params(self) -> dict[str, Any]:
        return {"name": self.name, "root": str(self.root), "modalities": self.modality_cfg, "label": self.label_cfg,
                "classes": list(self.classes), "value_map": self.value_map, "stem_regex": self.stem_regex.pattern,
                "splits": self.split_globs, "split_files": self.split_files, "val_fraction": self.val_fraction,
                "seed": self.seed, "resample": self.resample, "reference": self.reference, "version": 1}

    # -- scan -------------------------------------------------------------------------------------
    def _glob(self, pattern: str) -> list[Path]:
        root = Path(self.root or ".")
        return sorted(p for p in root.glob(pattern) if p.is_file())

    def _sample_id(self, path: Path) -> str | None:
        stem = path.name.split(".")[0]
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
        keys = {name: m["glob"] for name, m in self.modality_cfg.items()}
        if self.label_cfg.get("glob"):
            keys["label"] = self.label_cfg["glob"]
        for key, pattern in keys.items():
            found = self._index(key, pattern)
            if not found:
                raise DataError(f"no files match {key} glob {pattern!r} under {root} (with stem_regex "
                                f"{self.stem_regex.pattern!r}); fix dataset.layout.modalities/label or dataset.root.")
            if key != "label":
                self._first_file[key] = next(iter(found.values()))
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
    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        key = self.reference if self.reference != "label" or ref.files.get("label") else next(iter(self.modality_cfg))
        path = ref.files.get(key) or next((p for p in ref.files.values() if p), "")
        if not path:
            raise DataError(f"sample {ref.id}: no file for {key}; every sample needs one.")
        h = raster_header(path)
        return int(h["height"]), int(h["width"])

    def read(self, ref: SampleRef) -> Sample:
        for key, path in ref.files.items():
            if not path:
                present = next(p for p in ref.files.values() if p)
                raise DataError(f"{present}: sample {ref.id} has no {key} file (glob "
                                f"{self.modality_cfg.get(key, self.label_cfg).get('glob')!r}); add it or remove the "
                                "sample's other files.")
        ref_key = self.reference if self.reference != "label" or "label" in ref.files else next(iter(self.modality_cfg))
        ref_path = ref.files[ref_key]
        ref_header = raster_header(ref_path)
        arrays: dict[str, np.ndarray] = {}
        for name, spec in self.modalities.items():
            path = ref.files[name]
            data, header = read_raster(path)
            if data.shape[0] != len(spec.bands):
                raise DataError(f"{path}: {name} has {data.shape[0]} bands but dataset.layout.modalities.{name}.bands "
                                f"lists {len(spec.bands)} ({', '.join(spec.bands)}); fix the file or the band list.")
            if name != ref_key:
                data = self._align(data, header, path, ref_header, ref_path, spec.nodata, Resampling.bilinear)
            arrays[name] = data.astype(spec.dtype, copy=False)
        if "label" in ref.files:
            lab_path = ref.files["label"]
            raw, header = read_raster(lab_path)
            if ref_key != "label":
                raw = self._align(raw, header, lab_path, ref_header, ref_path, header.get("nodata"), Resampling.nearest)
            label = self._decode_label(raw, header, lab_path)
        else:
            label = np.full((ref_header["height"], ref_header["width"]), self.ignore_index, np.uint8)
        crs, transform = georef(ref_header)
        return Sample(arrays=arrays, label=label, source=str(ref_path), crs=crs, transform=transform)

    def _decode_label(self, raw: np.ndarray, header: Mapping[str, Any], path: str) -> np.ndarray:
        if self.label_cfg.get("colour"):
            label, n = decode_colour_label(np.moveaxis(raw[:3], 0, -1), self.palette, path,
                                           ignore_colours=self.label_cfg.get("ignore_colours") or (),
                                           ignore_index=self.ignore_index,
                                           tolerance=int(self.label_cfg.get("tolerance", 0)))
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
        nodata = self.label_cfg.get("nodata", header.get("nodata"))
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

    def _align(self, data: np.ndarray, header: Mapping[str, Any], path: str, ref: Mapping[str, Any], ref_path: str,
               nodata: float | None, resampling: Resampling) -> np.ndarray:
        """Return `data` on the reference grid: as is when it already is, warped when asked, else refused."""
        same_crs = (header["crs"] == ref["crs"]) or (not header["crs"] and not ref["crs"])
        same_res = all(abs(a - b) <= GRID_TOLERANCE * max(abs(b), 1e-12) for a, b in zip(header["res"], ref["res"]))
        same_grid = same_crs and same_res and header["transform"].almost_equals(ref["transform"]) \
            and (header["height"], header["width"]) == (ref["height"], ref["width"])
        if same_grid:
            return data
        if not (same_crs and same_res) and not self.resample:
            raise DataError(
                f"{path} ({header['crs'] or 'no CRS'}, {_res_str(header['res'])}) and {ref_path} "
                f"({ref['crs'] or 'no CRS'}, {_res_str(ref['res'])}) differ in CRS or resolution; set "
                "dataset.layout.resample=true to warp them onto the reference grid, or reproject the files.")
        if not self.resample:
            return data  # same CRS and pixel size, other extent: the store reports the size mismatch
        if not header["crs"] or not ref["crs"]:
            raise DataError(f"{path} or {ref_path} has no CRS, so it cannot be resampled; georeference both files.")
        out_dtype = data.dtype
        work = data.astype(np.float32) if resampling != Resampling.nearest else data
        fill = nodata if nodata is not None else (np.nan if np.issubdtype(work.dtype, np.floating) else 0)
        dst = np.full((data.shape[0], ref["height"], ref["width"]), fill, dtype=work.dtype)
        reproject(work, dst, src_transform=header["transform"], src_crs=header["crs"], src_nodata=nodata,
                  dst_transform=ref["transform"], dst_crs=ref["crs"], dst_nodata=fill, resampling=resampling)
        if np.issubdtype(out_dtype, np.integer) and work.dtype != out_dtype:
            info = np.iinfo(out_dtype)
            dst = np.clip(np.rint(np.nan_to_num(dst, nan=fill if fill is not None else 0)), info.min, info.max)
        return dst.astype(out_dtype)


def _with_glob(cfg: dict[str, Any]) -> dict[str, Any]:
    """Accept `folder` + `pattern` (default *.tif) as another way to write `glob`."""
    cfg = dict(cfg)
    if not cfg.get("glob") and cfg.get("folder"):
        cfg["glob"] = f"{str(cfg['folder']).rstrip('/')}/{cfg.get('pattern') or '*.tif'}"
    return cfg


def _res_str(res: Sequence[float]) -> str:
    return f"{res[0]:g}x{res[1]:g} per pixel"


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(12345)
    base = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    while len(base) < n:
        base.append(tuple(int(v) for v in rng.integers(0, 256, 3)))
    return base[:n]
