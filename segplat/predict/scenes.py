"""The scenes a prediction reads: listing inputs (rasters, folders, list files, dataset layouts), pairing modalities
by name, and opening each scene's rasters on one grid."""


from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from segplat.data.layouts.base import SampleRef
from segplat.errors import ConfigError, DataError
from segplat.inference import (
    ArraySource,
    LoadedModel,
    read_filled,
    scene_size,
)

log = logging.getLogger("segplat")
# extensions stripped from an input's name to make the output stem (one, and only a known one)
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".png", ".jpg", ".jpeg")
LIST_SUFFIXES = (".txt", ".csv", ".lst")
ID_SEPARATORS = "_-."  # where a folder's shared prefix or suffix may be cut off a file name to pair modalities
DEFAULT_SPLIT = "test"  # the split a dataset-layout input is predicted from when split= is not given


@dataclass(frozen=True)
class Scene:
    """One scene to predict: raster files per modality, or a sample of a dataset-layout folder."""

    name: str  # the primary input's file name (the clouds submission's Image_Label)
    stem: str  # prefix of the outputs
    files: tuple[tuple[str, str], ...] = ()  # (modality, path) of a raster scene
    ref: SampleRef | None = None
    size: tuple[int, int] | None = None  # (height, width) on the label grid, when known before reading


def output_stem(name: str) -> str:
    """The file name without its raster extension: `scene.v2.tif` -> `scene.v2` (never two suffixes)."""
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in RASTER_SUFFIXES else name


def is_raster_name(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES and not path.name.startswith(".")


def list_scenes(cfg: DictConfig, loaded: LoadedModel) -> list[Scene]:
    """Every scene `input` names, in a stable order, their files' headers checked against the model."""
    inp = cfg.input
    modalities = loaded.modalities
    if isinstance(inp, DictConfig):
        paths = {str(k): Path(str(v)).expanduser() for k, v in OmegaConf.to_container(inp, resolve=True).items()}
        unknown = [m for m in paths if m not in loaded.specs]
        if unknown:
            raise ConfigError(f"input names modalities {unknown} the model does not take; it takes {modalities}.")
        missing = [m for m in modalities if m not in paths]
        if missing:
            raise ConfigError(f"input lacks modality {missing[0]!r}; give input.{missing[0]}=FILE (or FOLDER) for "
                              f"each of {modalities}.")
        if all(p.is_dir() for p in paths.values()):
            scenes = scenes_from_folders({m: paths[m] for m in modalities})
        elif all(p.is_file() for p in paths.values()):
            scenes = [raster_scene({m: paths[m] for m in modalities})]
        else:
            bad = next(m for m, p in paths.items() if not p.exists() or p.is_dir() != paths[modalities[0]].is_dir())
            what = "does not exist" if not paths[bad].exists() else "is not the same kind (file or folder) as " \
                   f"input.{modalities[0]}"
            raise ConfigError(f"input.{bad}={paths[bad]} {what}; give one file per modality, or one folder per "
                              "modality with files matched by name.")
    elif isinstance(inp, ListConfig):
        raise ConfigError("input is a list; give a list file (one scene per line), a folder, a raster or "
                          "{modality: FILE}.")
    else:
        path = Path(str(inp)).expanduser()
        if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            scenes = scenes_from_list(path, loaded)
        elif path.is_file():
            if len(modalities) != 1:
                raise ConfigError(f"input={path} is one file but the model takes {modalities}; give "
                                  "input={" + ", ".join(f"{m}: FILE" for m in modalities) + "}.")
            scenes = [raster_scene({modalities[0]: path})]
        elif path.is_dir():
            scenes = scenes_from_folder(path, cfg, loaded)
        else:
            raise ConfigError(f"input={inp} does not exist; give a raster, a folder, a list file or "
                              "{modality: FILE}.")
    split = OmegaConf.select(cfg, "split", default=None)
    if split is not None and scenes and all(s.ref is None for s in scenes):
        raise ConfigError(f"split={split} picks a split of a dataset-layout folder, but input={inp} names raster "
                          "files, which are all predicted; drop split=.")
    scenes = [check_scene_files(s, loaded) if s.files else s for s in scenes]
    seen: dict[str, Scene] = {}
    for s in scenes:
        if s.stem in seen:
            raise DataError(f"two scenes would write {s.stem}_classes.tif ({seen[s.stem].name} and {s.name}, from "
                            f"{_where(seen[s.stem])} and {_where(s)}); predict them into separate run folders.")
        seen[s.stem] = s
    if not scenes:
        raise DataError(f"input={inp} holds no scenes to predict.")
    return scenes


def _where(scene: Scene) -> str:
    return scene.files[0][1] if scene.files else (scene.ref.id if scene.ref else scene.name)


def raster_scene(paths: Mapping[str, Path], stem: str | None = None) -> Scene:
    first = Path(next(iter(paths.values())))
    return Scene(first.name, stem or output_stem(first.name), tuple((m, str(p)) for m, p in paths.items()))


def common_start(texts: Sequence[str]) -> str:
    """The longest string every text starts with."""
    first, last = min(texts), max(texts)  # the sorted extremes differ first where any two do
    n = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    return first[:n]


def scene_ids(stems: Sequence[str], front: bool = True, back: bool = True) -> dict[str, str]:
    """stem -> scene id: the stem without the prefix (`front`) and suffix (`back`) that every stem of the folder
    shares, cut at a separator (`Spain_226704_S1Hand` -> `Spain_226704` in a folder of `*_S1Hand` files), so that
    folders whose files are named per modality pair up; stems unchanged where that leaves an id empty or not
    unique."""
    if len(stems) < 2:
        return {s: s for s in stems}
    prefix = common_start(stems) if front else ""
    suffix = common_start([s[::-1] for s in stems])[::-1] if back else ""
    cut_front = max((prefix.rfind(c) + 1 for c in ID_SEPARATORS), default=0)
    starts = [suffix.find(c) for c in ID_SEPARATORS if c in suffix]
    cut_back = len(suffix) - min(starts) if starts else 0
    ids = {s: s[cut_front:len(s) - cut_back] for s in stems}
    if any(not i for i in ids.values()) or len(set(ids.values())) != len(ids):
        return {s: s for s in stems}
    return ids


def scenes_from_folders(folders: Mapping[str, Path]) -> list[Scene]:
    """Scenes of one folder per modality, matched by output stem (`a.tif` in rgb/ with `a.tif` in nir/), else by
    the stems without each folder's shared affixes (`X_S1Hand.tif` in S1Hand/ with `X_S2Hand.tif` in S2Hand/)."""
    by_modality = {m: {output_stem(p.name): p for p in sorted(d.iterdir()) if p.is_file() and is_raster_name(p)}
                   for m, d in folders.items()}
    names = list(folders)
    if not by_modality[names[0]]:
        raise DataError(f"{folders[names[0]]} holds no raster files ({', '.join(RASTER_SUFFIXES)}).")

    def unpaired(files: Mapping[str, Mapping[str, Path]]) -> int:
        return sum(s not in files[m] for m in names[1:] for s in files[names[0]])

    # exact names first, then the least cut off that pairs every scene (or, failing that, the most scenes)
    candidates = [by_modality]
    for front, back in ((False, True), (True, False), (True, True)):
        ids = {m: scene_ids(list(files), front, back) for m, files in by_modality.items()}
        candidates.append({m: {ids[m][s]: p for s, p in files.items()} for m, files in by_modality.items()})
    chosen = min(candidates, key=unpaired)  # the first of the best
    if chosen is not by_modality and not unpaired(chosen):
        example = next(iter(chosen[names[0]]))
        log.info("scenes matched by file name without each folder's shared prefix or suffix: %s is %s",
                 example, " + ".join(chosen[m][example].name for m in names))
    by_modality = chosen
    primary = by_modality[names[0]]
    for m in names[1:]:
        lacking = [s for s in primary if s not in by_modality[m]]
        if lacking:
            raise DataError(f"{folders[names[0]] / primary[lacking[0]].name} has no {m} file of the same name in "
                            f"{folders[m]}, nor one that differs only by a prefix or suffix all files of each folder "
                            f"share ({len(lacking)} scene(s) lack one); add them or remove the scenes.")
        extra = [s for s in by_modality[m] if s not in primary]
        if extra:
            log.warning("%d file(s) in %s have no %s partner in %s and are left out (e.g. %s)", len(extra),
                        folders[m], names[0], folders[names[0]], by_modality[m][extra[0]].name)
    return [raster_scene({m: by_modality[m][stem] for m in names}, stem) for stem in primary]


def scenes_from_list(path: Path, loaded: LoadedModel) -> list[Scene]:
    """A list file: one raster per line (single-modality models) or a comma-separated header naming the
    modalities and one row of files per scene; `#` comments and blank lines skipped, relative paths taken
    from the list file's folder."""
    modalities = loaded.modalities
    lines = [(i + 1, line.strip()) for i, line in enumerate(path.read_text().splitlines())]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise DataError(f"{path} lists no scenes; give one raster per line.")
    header = [c.strip() for c in lines[0][1].split(",")]
    if set(header) == set(modalities) and len(header) == len(modalities):
        lines = lines[1:]
    elif len(modalities) == 1:
        header = modalities
    else:
        raise DataError(f"{path}: the first line must name the modalities ({','.join(modalities)}), then one row "
                        "of files per scene in that order.")
    scenes = []
    for number, line in lines:
        cells = [c.strip() for c in line.split(",")] if len(header) > 1 else [line]
        if len(cells) != len(header):
            raise DataError(f"{path} line {number} has {len(cells)} file(s) but the header names {len(header)} "
                            f"({','.join(header)}); give one file per modality.")
        files = {m: (path.parent / Path(c).expanduser()) for m, c in zip(header, cells)}
        scenes.append(raster_scene({m: files[m] for m in modalities}))
    return scenes


def scenes_from_folder(path: Path, cfg: DictConfig, loaded: LoadedModel) -> list[Scene]:
    """A folder: one subfolder per modality, raster files (single-modality), else the training layout."""
    modalities = loaded.modalities
    if all((path / m).is_dir() for m in modalities):
        return scenes_from_folders({m: path / m for m in modalities})
    rasters = sorted(p for p in path.iterdir() if p.is_file() and is_raster_name(p))
    if rasters:
        if len(modalities) != 1:
            raise ConfigError(f"{path} holds raster files but the model takes {modalities}; put each modality's files "
                              f"in {path}/<modality>/ (matched by name) or give input={{"
                              + ", ".join(f"{m}: FOLDER" for m in modalities) + "}.")
        return [raster_scene({modalities[0]: p}) for p in rasters]
    layout = build_layout(loaded, path)
    splits = layout.scan()
    split = layout_split(cfg)
    if split not in splits:
        raise ConfigError(f"split={split} is not in {path}; it has {', '.join(splits)}.")
    scenes = []
    for ref in splits[split]:
        first = next(iter(ref.files.values()), None) if ref.files else None
        name = Path(first).name if first else ref.id
        # outputs are named after the sample (Spain_226704, not its Spain_226704_LabelHand.tif; 10004, not
        # TARGET_10004.npy); the name (the first file's) is what a submission and the messages show
        stem = re.sub(r"[^\w.-]+", "_", ref.id.rsplit("/", 1)[-1]) or output_stem(name)
        scenes.append(Scene(name, stem, ref=ref))
    return scenes


def layout_split(cfg: DictConfig) -> str:
    """The split of a dataset-layout input: `split`, else the test split."""
    return str(OmegaConf.select(cfg, "split", default=None) or DEFAULT_SPLIT)


def build_layout(loaded: LoadedModel, root: Path) -> Any:
    layout_cfg = OmegaConf.select(loaded.config, "dataset.layout")
    if layout_cfg is None:
        raise ConfigError(f"{root} holds no raster files or modality folders, and the checkpoint {loaded.checkpoint} "
                          "has no dataset layout to read it with; give rasters, a list file or {modality: FILE}.")
    return hydra.utils.instantiate(layout_cfg, root=str(root))


# -- reading -----------------------------------------------------------------------------------------------
@contextmanager
def open_input(path: str | Path) -> Iterator[Any]:
    """rasterio.open of an input, with a missing or unreadable file turned into one sentence."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file {p} does not exist; check the input= path.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(p)
    except RasterioIOError as err:
        raise DataError(f"{p} could not be read as a raster ({err}); check the file.") from err
    with src:
        yield src


def read_class_raster(path: Path, out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Band 1 of a class raster this module wrote; one without georeference (its input had none, as the
    clouds PNGs) is read without GDAL's warning, which the scene's log line already says once."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read(1, out_shape=out_shape, resampling=Resampling.nearest)


def bands_by_description(src: Any, bands: Sequence[str]) -> list[int] | None:
    """The 1-based bands to read, in the model's order, when the file's band descriptions name every band the model
    was trained on (a 13-band Sentinel-2 file for a 4-band model, or blue-green-red for red-green-blue); None to
    read the file as it is (no descriptions, or names the model does not use)."""
    described = [(d or "").strip().lower() for d in src.descriptions]
    wanted = [b.strip().lower() for b in bands]
    if not all(described) or len(set(described)) != len(described) or not set(wanted) <= set(described):
        return None
    indexes = [described.index(b) + 1 for b in wanted]
    return None if indexes == list(range(1, src.count + 1)) else indexes


class RasterSource:
    """One modality of a scene, read window by window from its file (on its own grid); `indexes` picks and orders
    its bands (1-based), all of them in file order when None."""

    def __init__(self, dataset: Any, indexes: list[int] | None = None) -> None:
        self.dataset = dataset
        self.indexes = indexes
        self.shape = (len(indexes) if indexes else dataset.count, dataset.height, dataset.width)
        self.dtype = np.dtype(dataset.dtypes[0])

    def read(self, row: int, col: int, height: int, width: int, fill: float) -> np.ndarray:
        return read_filled(self.shape, self.dtype, row, col, height, width, fill, self._read)

    def _read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        try:
            return self.dataset.read(self.indexes, window=Window(c0, r0, c1 - c0, r1 - r0))
        except RasterioError as err:
            cause = str(err.__cause__ or err).strip().rstrip(".")
            raise DataError(f"{self.dataset.name}: rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1} could not be read "
                            f"({cause}); the file is damaged or truncated: re-create it or leave it out.") from err


def header(src: Any) -> dict[str, Any]:
    return {"crs": src.crs, "transform": src.transform, "nodata": src.nodata, "width": src.width,
            "height": src.height, "bounds": src.bounds, "count": src.count, "dtype": src.dtypes[0],
            "path": src.name}


def check_scene_alignment(profiles: Mapping[str, dict[str, Any]], loaded: LoadedModel) -> None:
    """Modalities of one scene must lie on the primary's grid (docs/geodata.md), coarsened by the model's
    scale for coarser streams; their sizes must follow the model's scales."""
    from rasterio.transform import Affine

    from segplat.data.raster import Grid, grid_relation

    primary = loaded.modalities[0]
    ref = Grid.of(profiles[primary])
    for m in profiles:
        spec = loaded.specs[m]
        want = (round(ref.height * spec.scale), round(ref.width * spec.scale))
        if spec.scale == 1:
            expected = ref
        else:
            expected = ref.scaled(1 / spec.scale, *want) if ref.georeferenced else Grid(None, Affine.identity(), *want)
        grid_relation(Grid.of(profiles[m]), profiles[m]["path"], expected, profiles[primary]["path"], resample=False,
                      resample_key=None)
        have = (profiles[m]["height"], profiles[m]["width"])
        if have != want:
            raise DataError(f"{profiles[m]['path']} is {have[1]}x{have[0]} pixels but the model expects {want[1]}x"
                            f"{want[0]} for {m} next to {profiles[primary]['path']}; resample it to the trained grid.")


def check_scene_files(scene: Scene, loaded: LoadedModel) -> Scene:
    """Open every file's header (not its pixels): existence, band counts, grids, sizes; the scene with its size."""
    profiles = {}
    for m, path in scene.files:
        with open_input(path) as src:
            profiles[m] = header(src)
            picked = bands_by_description(src, loaded.specs[m].bands)
            if picked is not None:  # the count the model sees
                profiles[m]["count"] = len(picked)
    shapes = {m: (p["count"], p["height"], p["width"]) for m, p in profiles.items()}
    size = scene_size(loaded, shapes, {m: p["path"] for m, p in profiles.items()})  # bands and sizes first
    check_scene_alignment(profiles, loaded)
    return Scene(scene.name, scene.stem, scene.files, scene.ref, size)


@dataclass
class OpenScene:
    sources: dict[str, Any]
    nodata: dict[str, float | None]
    names: dict[str, str]  # what each modality is read from, for messages
    crs: Any = None
    transform: Any = None  # of the label grid; None without georeferencing
    # ground control points of a primary file georeferenced by them only, on the label grid, with their CRS
    gcps: tuple[list[Any], Any] | None = None

    def georeference_note(self) -> str:
        """What the scene's log line says when the outputs carry no geotransform."""
        if self.crs is not None:
            return ""
        if self.gcps:
            return (f"; the input is georeferenced by {len(self.gcps[0])} ground control points, which the outputs "
                    "carry too (warp them, e.g. gdalwarp -tps, for a map grid)")
        return "; the input has no georeference, so neither have its outputs"


@contextmanager
def open_scene(scene: Scene, loaded: LoadedModel, layout: Any = None) -> Iterator[OpenScene]:
    """Window sources of a scene: its files kept open and streamed, or a layout's sample read whole."""
    from affine import Affine
    from rasterio.control import GroundControlPoint

    if not scene.files:
        sample = layout.read(scene.ref)
        transform = Affine(*sample.transform[:6]) if sample.crs is not None and sample.transform is not None else None
        yield OpenScene({m: ArraySource(sample.arrays[m]) for m in loaded.modalities},
                        {m: loaded.specs[m].nodata for m in loaded.modalities},
                        {m: sample.source for m in loaded.modalities}, sample.crs if transform else None, transform)
        return
    with ExitStack() as stack:
        sources, nodata, names, profiles = {}, {}, {}, {}
        for m, path in scene.files:
            src = stack.enter_context(open_input(path))
            picked = bands_by_description(src, loaded.specs[m].bands)
            if picked is not None:
                log.info("%s: bands %s by their descriptions, for the model's %s", path, picked,
                         ", ".join(loaded.specs[m].bands))
            sources[m], profiles[m], names[m] = RasterSource(src, picked), header(src), str(path)
            profiles[m]["gcps"] = src.gcps
            nodata[m] = src.nodata if src.nodata is not None else loaded.specs[m].nodata
            if np.dtype(src.dtypes[0]) != np.dtype(loaded.specs[m].dtype):
                log.warning("%s is %s but the model was trained on %s for %s; its values are normalised with the "
                            "training statistics as they are", path, src.dtypes[0], loaded.specs[m].dtype, m)
        primary = profiles[loaded.modalities[0]]
        transform = primary["transform"] @ Affine.scale(loaded.specs[loaded.modalities[0]].scale)
        georeferenced = primary["crs"] is not None
        points, points_crs = primary["gcps"]
        gcps = None
        if points and not georeferenced:  # on the label grid: a primary pixel p is label pixel p / scale
            scale = loaded.specs[loaded.modalities[0]].scale
            gcps = ([GroundControlPoint(row=g.row / scale, col=g.col / scale, x=g.x, y=g.y, z=g.z, id=g.id,
                                        info=g.info) for g in points], points_crs)
        yield OpenScene(sources, nodata, names, primary["crs"] if georeferenced else None,
                        transform if georeferenced else None, gcps)

