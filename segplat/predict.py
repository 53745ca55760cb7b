"""`python -m segplat.predict ckpt=RUN input=...`: sliding-window prediction of scenes of any size and number.

Inputs (`input=`): one raster (single-modality models); `{rgb: a.tif, nir: b.tif}` (one file per modality);
`{rgb: DIR_A, nir: DIR_B}` (many scenes, files matched by name); a folder holding one subfolder per modality
(`FOLDER/rgb/`, `FOLDER/nir/`, matched by name) or, for single-modality models, raster files; a list file
(`.txt`/`.csv`/`.lst`: one raster per line, or a header naming the modalities and one row of files per scene);
otherwise a folder in the training dataset's layout (`split` picks the split; its samples are read whole by
the layout, as in training).

Rasters are streamed: windows are read per modality on each modality's own grid (rasterio windowed reads),
predicted in batches and blended in a ring of rows (`SlidingWindowPredictor.stream`); finished rows go to disk
at once. Peak memory is set by the window, the batch, the GDAL cache (`gdal_cache_mb`) and one window-high band
of the scene's width, not by the scene's height.

Outputs per scene, in the run folder: `<stem>_classes.tif`, a Cloud-Optimized GeoTIFF (tiled, compressed,
overviews by mode) of class indices with the input's CRS and transform, nodata 255 where every modality is
nodata, the dataset palette as its colour table and the class names as category names (in
`<stem>_classes.tif.aux.xml`, where GDAL keeps them for GeoTIFFs) and in the `classes` tag;
optional `<stem>_probs.tif` (`probabilities=uint8|float16`); `<stem>_colour.png` and `<stem>_overlay.png`
previews with a class legend (`output.preview_size`); `summary.json`; for the clouds competition,
`submission.csv`. `<stem>` is the input's file name without its extension (`scene.v2.tif` -> `scene.v2`).

Many processes (`torchrun` / `accelerate launch`): rank 0 lists the scenes and shares the list; scene i is
predicted by rank i mod world size, so each scene is written by exactly one process. Every file is written
under `.partial/` and renamed into place, the class raster last: a scene whose outputs all exist is complete,
and running the same command with the same `run_name` again skips it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from segplat.config import check_values
from segplat.data.layouts.base import SampleRef
from segplat.errors import ConfigError, DataError, SegplatError
from segplat.inference import (
    ArraySource,
    LoadedModel,
    RowBand,
    SlidingWindowPredictor,
    add_legend,
    colourise,
    load_for_inference,
    overlay,
    preview_rgb,
    read_filled,
    scene_size,
)
from segplat.utils.io import atomic_write, atomic_write_json, atomic_write_text
from segplat.utils.plain import to_plain
from segplat.utils.task import CONF_DIR, remove_if_no_results, run_dir_of, task_wrapper, with_config_hints

log = logging.getLogger("segplat")
NODATA_CLASS = 255
# probabilities=uint8 stores round(p * 254); 255 is nodata; the band's GDAL scale 1/254 gives p back
UINT8_PROBABILITY_SCALE = 254
PROBABILITY_FORMATS = ("uint8", "float16")
COMPRESSIONS = ("deflate", "zstd", "lzw", "none")
SUBMISSIONS = ("clouds", "clouds_per_class")
# extensions stripped from an input's name to make the output stem (one, and only a known one)
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".png", ".jpg", ".jpeg")
LIST_SUFFIXES = (".txt", ".csv", ".lst")
PARTIAL = ".partial"
STREAM_STRIP_ROWS = 16  # rows per strip of the intermediate GeoTIFFs the stream writes into
ID_SEPARATORS = "_-."  # where a folder's shared prefix or suffix may be cut off a file name to pair modalities
DEFAULT_SPLIT = "test"  # the split a dataset-layout input is predicted from when split= is not given


# -- scenes ----------------------------------------------------------------------------------------------
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
    """Modalities of one scene must lie on the primary's grid (README "Geodata rules"), coarsened by the model's
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


# -- writing -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputFiles:
    """Where a scene's outputs go: final names in the run folder, work names under `.partial/`."""

    folder: Path
    stem: str
    probabilities: str | None
    previews: bool

    @property
    def classes(self) -> Path:
        return self.folder / f"{self.stem}_classes.tif"

    @property
    def categories(self) -> Path:  # GDAL's sidecar for the class names of a GeoTIFF band
        return self.folder / f"{self.stem}_classes.tif.aux.xml"

    def final(self) -> list[Path]:
        """Every output, the class raster (the mark of a complete scene) last."""
        names = [f"{self.stem}_probs.tif"] if self.probabilities else []
        names += [f"{self.stem}_colour.png", f"{self.stem}_overlay.png"] if self.previews else []
        return [self.folder / n for n in names] + [self.categories, self.classes]

    @property
    def work(self) -> Path:
        """This scene's own work folder: only the process that predicts the scene writes or clears it."""
        return self.folder / PARTIAL / self.stem

    def partial(self, name: str) -> Path:
        return self.work / name

    def complete(self) -> bool:
        return all(p.is_file() for p in self.final())

    def clear_partial(self) -> None:
        """The work files a killed run left for this scene."""
        shutil.rmtree(self.work, ignore_errors=True)


def category_names_xml(classes: Sequence[str]) -> str:
    """GDAL's PAM sidecar (`.aux.xml`) holding a band's category names: where GDAL keeps them for a GeoTIFF."""
    items = "".join(f"      <Category>{escape(c)}</Category>\n" for c in classes)
    return (f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n{items}    </CategoryNames>\n'
            "  </PAMRasterBand>\n</PAMDataset>\n")


class SceneWriter:
    """Rows of one scene into striped GeoTIFFs under `.partial/`, then Cloud-Optimized GeoTIFFs, previews, rename.

    Rows arrive in bands (`RowBand`) and are written as they come: the intermediate files are striped, so no
    block row has to be held in memory; GDAL's COG driver then tiles, compresses and adds overviews, reading
    the intermediate through its block cache.
    """

    def __init__(self, files: OutputFiles, height: int, width: int, crs: Any, transform: Any, loaded: LoadedModel,
                 output: DictConfig, gcps: tuple[list[Any], Any] | None = None) -> None:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.files, self.loaded, self.output = files, loaded, output
        self.height, self.width = height, width
        self.preview = PreviewSampler(loaded, height, width, int(output.preview_size)) if files.previews else None
        files.work.mkdir(parents=True, exist_ok=True)
        profile = {"driver": "GTiff", "height": height, "width": width, "crs": crs, "transform": transform,
                   "blockysize": min(STREAM_STRIP_ROWS, height), "compress": "deflate", "zlevel": 1}
        if transform is None:
            profile.pop("transform")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.classes = rasterio.open(files.partial(f"{files.stem}_classes.stream.tif"), "w", count=1,
                                         dtype="uint8", nodata=NODATA_CLASS, **profile)
            self.classes.write_colormap(1, colour_table(loaded.palette))
            self.classes.update_tags(1, classes=",".join(loaded.classes))
            self.classes.set_band_description(1, "class")
            self.probs = None
            k = len(loaded.classes)
            if files.probabilities == "uint8":
                self.probs = rasterio.open(files.partial(f"{files.stem}_probs.stream.tif"), "w", count=k,
                                           dtype="uint8", nodata=255, **profile)
                self.probs.scales = [1 / UINT8_PROBABILITY_SCALE] * k
            elif files.probabilities == "float16":
                self.probs = rasterio.open(files.partial(f"{files.stem}_probs.stream.tif"), "w", count=k,
                                           dtype="float32", nbits=16, nodata=float("nan"), **profile)
            if self.probs is not None:
                for i, c in enumerate(loaded.classes):
                    self.probs.set_band_description(i + 1, c)
                self.probs.update_tags(classes=",".join(loaded.classes))
            if gcps is not None:  # GDAL's COG copy keeps them
                for stream in (self.classes, self.probs):
                    if stream is not None:
                        stream.gcps = gcps

    def write(self, band: RowBand) -> None:
        from rasterio.windows import Window

        n = band.probs.shape[1]
        window = Window(0, band.row, self.width, n)
        classes = band.probs.argmax(0).astype(np.uint8)
        classes[~band.valid] = NODATA_CLASS
        self.classes.write(classes, 1, window=window)
        if self.probs is not None:
            if self.files.probabilities == "uint8":
                p = np.rint(band.probs * UINT8_PROBABILITY_SCALE).astype(np.uint8)
                p[:, ~band.valid] = 255
            else:
                p = band.probs.astype(np.float16).astype(np.float32)
                p[:, ~band.valid] = np.nan
            self.probs.write(p, window=window)

    def close(self) -> None:
        self.classes.close()
        if self.probs is not None:
            self.probs.close()

    def finish(self) -> None:
        """Close the streams, convert them to COGs, draw the previews, then move everything into place, the class
        raster last."""
        from rasterio.shutil import copy as copy_raster

        self.close()
        files, output = self.files, self.output
        compress = {"compress": output.compress} if output.compress != "none" else {"compress": "NONE"}
        cog = {"driver": "COG", "blocksize": int(output.blocksize), "overviews": "AUTO", "bigtiff": "IF_SAFER",
               **compress}
        stream = files.partial(f"{files.stem}_classes.stream.tif")
        copy_raster(stream, files.partial(files.classes.name), overview_resampling="MODE", **cog)
        stream.unlink()
        if self.probs is not None:
            stream = files.partial(f"{files.stem}_probs.stream.tif")
            nbits = {"nbits": 16} if files.probabilities == "float16" else {}
            copy_raster(stream, files.partial(f"{files.stem}_probs.tif"), overview_resampling="AVERAGE", **cog,
                        **nbits)
            stream.unlink()
        if files.previews:
            self.write_previews()
        atomic_write_text(files.categories, category_names_xml(self.loaded.classes))
        for path in files.final():
            if path != files.categories:
                os.replace(files.partial(path.name), path)
        files.clear_partial()

    def write_previews(self) -> None:
        """`_colour.png` (the palette, nodata transparent; from the class COG's overviews) and `_overlay.png` (over
        the primary modality as sampled during the stream): the map at most `output.preview_size` pixels on its
        long side, the class legend in a strip below it."""
        files, loaded, sampler = self.files, self.loaded, self.preview
        h, w = sampler.height, sampler.width
        classes = read_class_raster(files.partial(files.classes.name), out_shape=(h, w))
        rgb = colourise(classes, loaded.palette, NODATA_CLASS)
        data = classes != NODATA_CLASS
        colour = np.dstack([rgb, np.where(data, 255, 0).astype(np.uint8)])
        write_png(files.partial(f"{files.stem}_colour.png"), add_legend(colour, loaded.classes, loaded.palette))
        image = preview_rgb(sampler.image, loaded.specs[loaded.modalities[0]])
        blended = np.where(data[..., None], overlay(image, rgb), image)
        write_png(files.partial(f"{files.stem}_overlay.png"), add_legend(blended, loaded.classes, loaded.palette))


class PreviewSampler:
    """The primary modality at preview size, sampled (nearest) from the windows the predictor reads anyway:
    a second, decimated read of a large raster costs far more (GDAL walks every block for it)."""

    def __init__(self, loaded: LoadedModel, height: int, width: int, size: int) -> None:
        self.modality = loaded.modalities[0]
        self.scale = loaded.specs[self.modality].scale
        factor = min(1.0, size / max(height, width))
        self.height, self.width = max(1, round(height * factor)), max(1, round(width * factor))
        self.rows = np.arange(self.height) * height // self.height  # label-grid pixel of each preview pixel
        self.cols = np.arange(self.width) * width // self.width
        self.image: np.ndarray | None = None

    def __call__(self, coords: Sequence[tuple[int, int]], batch: Mapping[str, np.ndarray]) -> None:
        windows = batch[self.modality]
        size = windows.shape[-1] / self.scale  # window size on the label grid
        for (y, x), window in zip(coords, windows):
            if window.ndim == 4:  # a time series: the last date
                window = window[-1]
            window = window[:3]
            if self.image is None:
                self.image = np.zeros((window.shape[0], self.height, self.width), window.dtype)
            r = np.flatnonzero((self.rows >= y) & (self.rows < y + size))
            c = np.flatnonzero((self.cols >= x) & (self.cols < x + size))
            if r.size and c.size:
                local_r = ((self.rows[r] - y) * self.scale).astype(int)
                local_c = ((self.cols[c] - x) * self.scale).astype(int)
                self.image[:, r[:, None], c[None, :]] = window[:, local_r[:, None], local_c[None, :]]


def colour_table(palette: Sequence[Sequence[int]]) -> dict[int, tuple[int, int, int, int]]:
    """The palette as a GeoTIFF colour table; nodata transparent."""
    table = {i: (*(int(v) for v in c), 255) for i, c in enumerate(palette)}
    table[NODATA_CLASS] = (0, 0, 0, 0)
    return table


def write_png(path: Path, image: np.ndarray) -> Path:
    """An RGB(A) uint8 image as PNG, atomically (OpenCV wants BGR(A))."""
    order = cv2.COLOR_RGBA2BGRA if image.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, order))
    if not ok:
        raise DataError(f"could not encode {path} as PNG.")
    return atomic_write(path, lambda p: p.write_bytes(data.tobytes()))


# -- many processes ----------------------------------------------------------------------------------------
class Workers:
    """The processes of a launch (torchrun, accelerate launch, srun), or this one alone.

    A gloo group of its own with a long timeout carries the scene list out and the counts back: a process that
    finishes its share early may wait hours for the others, far past the default group's timeout.
    """

    def __init__(self, timeout: float) -> None:
        from segplat.utils.dist import global_rank, init_distributed, world_size

        self.group = None
        self.rank, self.world = global_rank(), world_size()
        if init_distributed() is not None:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=float(timeout)))

    def share(self, build: Any) -> Any:
        """`build()` on rank 0, its result (or its error, raised again) on every rank."""
        if self.group is None:
            return build()
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.rank == 0:
            try:
                payload = [("ok", build())]
            except SegplatError as err:
                payload = [("error", (type(err), str(err)))]
                dist.broadcast_object_list(payload, src=0, group=self.group)
                raise
            except BaseException:
                dist.broadcast_object_list([("error", (RuntimeError, "rank 0 failed listing the scenes; see its "
                                                       "log."))], src=0, group=self.group)
                raise
        dist.broadcast_object_list(payload, src=0, group=self.group)
        status, value = payload[0]
        if status == "error":
            kind, message = value
            raise kind(message)
        return value

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order, on every rank (after all have finished)."""
        if self.group is None:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out


# -- the task ----------------------------------------------------------------------------------------------
def check_predict_config(cfg: DictConfig) -> None:
    """Every key this task reads, checked before the checkpoint is loaded."""
    check_values(cfg)
    if cfg.probabilities is not None and cfg.probabilities not in PROBABILITY_FORMATS:
        shown = str(cfg.probabilities).lower() if isinstance(cfg.probabilities, bool) else cfg.probabilities
        raise ConfigError(f"probabilities={shown} is not a format; use uint8 (probability x "
                          f"{UINT8_PROBABILITY_SCALE}, one byte per class), float16, or null for none.")
    if cfg.submission is not None and cfg.submission not in SUBMISSIONS:
        raise ConfigError(f"submission={cfg.submission} is not known; use {' or '.join(SUBMISSIONS)}.")
    out = cfg.output
    if str(out.compress).lower() not in COMPRESSIONS:
        raise ConfigError(f"output.compress={out.compress} is not known; use one of {', '.join(COMPRESSIONS)}.")
    blocksize = out.blocksize
    if not isinstance(blocksize, int) or blocksize < 16 or blocksize & (blocksize - 1):
        raise ConfigError(f"output.blocksize={blocksize} must be a power of two of at least 16 (e.g. 512).")
    if not isinstance(out.preview_size, int) or out.preview_size < 0:
        raise ConfigError(f"output.preview_size={out.preview_size} must be a number of pixels (0: no previews).")
    if not isinstance(cfg.gdal_cache_mb, int) or cfg.gdal_cache_mb < 1:
        raise ConfigError(f"gdal_cache_mb={cfg.gdal_cache_mb} must be a positive number of megabytes.")
    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise ConfigError(f"limit={cfg.limit} must be a positive number of scenes, or null for all.")
    choose_device(cfg.device)


def check_submission_classes(cfg: DictConfig, loaded: LoadedModel) -> None:
    from segplat.submission import CLOUDS_CLASSES

    if cfg.submission and (len(loaded.classes) != len(CLOUDS_CLASSES) or
                           list(loaded.classes[1:]) != list(CLOUDS_CLASSES[1:])):
        raise ConfigError(f"submission={cfg.submission} needs a model of the clouds classes {list(CLOUDS_CLASSES)}; "
                          f"{loaded.checkpoint} predicts {loaded.classes}. Drop submission=.")


def choose_device(name: str) -> str:
    """`device=` as a torch device: auto is this process's GPU when there is one; a GPU asked for on a machine
    without one (or an index past the last) is refused in one sentence instead of CUDA's driver error."""
    from segplat.utils.dist import local_rank

    name = str(name)
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"device={name} is not known; use auto, cpu, cuda or cuda:N.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name}: this machine has no CUDA GPU that torch can use; use device=cpu "
                              "(or auto).")
        if name == "cuda":
            name = f"cuda:{local_rank() % count}"
        elif int(name.split(":")[1]) >= count:
            raise ConfigError(f"device={name}: this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1}).")
    return name


@dataclass
class Tally:
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    windows: int = 0
    seconds: float = 0.0


def predict_scenes(cfg: DictConfig, loaded: LoadedModel, predictor: SlidingWindowPredictor, scenes: list[Scene],
                   out_dir: Path, show: bool, layout: Any = None) -> Tally:
    """Predict this process's scenes, skipping complete ones; progress per scene and overall."""
    tally = Tally()
    started = time.perf_counter()
    with tqdm(total=len(scenes), desc="scenes", unit="scene", disable=not show) as bar:
        for scene in scenes:
            files = OutputFiles(out_dir, scene.stem, cfg.probabilities, cfg.output.preview_size > 0)
            if files.complete():
                tally.skipped.append(scene.stem)
                bar.update(1)
                continue
            files.clear_partial()
            t0 = time.perf_counter()
            writer = None
            try:
                with open_scene(scene, loaded, layout) as opened:
                    height, width = predictor.check_shapes({m: s.shape for m, s in opened.sources.items()},
                                                           opened.names)
                    windows = predictor.grid(height, width).num_windows
                    note = opened.georeference_note()
                    writer = SceneWriter(files, height, width, opened.crs, opened.transform, loaded, cfg.output,
                                         opened.gcps)
                    for band in predictor.stream(opened.sources, opened.nodata, desc=scene.stem, names=opened.names,
                                                 observe=writer.preview):
                        writer.write(band)
                    writer.finish()
            except BaseException:  # a scene that failed leaves no work files (a killed one is cleared on re-run)
                if writer is not None:
                    writer.close()
                files.clear_partial()
                raise
            seconds = time.perf_counter() - t0
            tally.predicted.append(scene.stem)
            tally.windows += windows
            log.info("%s: %dx%d px, %d windows in %.1f s (%.1f windows/s)%s", scene.stem, width, height, windows,
                     seconds, windows / max(seconds, 1e-9), note)
            bar.update(1)
            bar.set_postfix(windows=tally.windows)
    tally.seconds = time.perf_counter() - started
    return tally


def write_submission_csv(cfg: DictConfig, scenes: Sequence[Scene], out_dir: Path) -> Path:
    """submission.csv from the class rasters on disk, so scenes of every process and of earlier runs count."""
    from segplat.submission import write_submission

    def rows() -> Iterator[tuple[str, np.ndarray]]:
        for scene in scenes:
            classes = read_class_raster(out_dir / f"{scene.stem}_classes.tif")
            yield scene.name, np.where(classes == NODATA_CLASS, 0, classes)

    return write_submission(rows(), out_dir / "submission.csv", per_class=cfg.submission == "clouds_per_class")


def predict(cfg: DictConfig) -> Path:
    out_dir = run_dir_of(cfg)
    try:
        return run_prediction(cfg, out_dir)
    except BaseException:
        if not any((out_dir / PARTIAL).glob("*")):
            remove_if_no_results(out_dir, "predict", (PARTIAL, SETTINGS_FILE))
        raise


SETTINGS_FILE = "prediction.json"


def prediction_settings(cfg: DictConfig, loaded: LoadedModel, window: int) -> dict[str, Any]:
    """What decides the bytes of a scene's outputs: the checkpoint file, the input and the predictor's settings
    (not batch size, device, progress or limit)."""
    ckpt = Path(loaded.checkpoint).resolve()
    stat = ckpt.stat()
    return {"checkpoint": str(ckpt), "checkpoint_bytes": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
            "input": to_plain(cfg.input), "split": layout_split(cfg), "window": window, "overlap": cfg.overlap,
            "tta": to_plain(cfg.tta), "probabilities": cfg.probabilities, "output": to_plain(cfg.output)}


def claim_run_folder(out_dir: Path, settings: dict[str, Any]) -> None:
    """A run folder resumes only the prediction it holds: its complete scenes are skipped, so predicting into it
    with another checkpoint, input or settings would keep the old outputs under the new summary."""
    import json

    path = out_dir / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            shown = "; ".join(f"{k}: {before.get(k)!r} now {settings[k]!r}" for k in changed[:3])
            raise ConfigError(f"run folder {out_dir} holds predictions made with other settings ({shown}); its "
                              "scenes would be kept as they are, so give a new run_name (or delete the folder).")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def run_prediction(cfg: DictConfig, out_dir: Path) -> Path:
    import rasterio

    check_predict_config(cfg)
    workers = Workers(cfg.dist_timeout)
    device = choose_device(cfg.device)
    loaded = load_for_inference(cfg.ckpt, device=device)
    check_submission_classes(cfg, loaded)
    predictor = SlidingWindowPredictor(loaded, window=cfg.window, overlap=cfg.overlap, batch_size=cfg.batch_size,
                                       flips=cfg.tta.flips, scales=list(cfg.tta.scales), device=device,
                                       progress=cfg.progress and workers.rank == 0)
    with rasterio.Env(GDAL_CACHEMAX=int(cfg.gdal_cache_mb)):
        def listing() -> list[Scene]:
            scenes = list_scenes(cfg, loaded)
            return scenes[:cfg.limit] if cfg.limit is not None else scenes

        scenes = workers.share(listing)
        workers.share(lambda: claim_run_folder(out_dir, prediction_settings(cfg, loaded, predictor.window)))
        layout = None
        if any(not s.files for s in scenes):
            layout = build_layout(loaded, Path(str(cfg.input)).expanduser())
            layout.scan()
        out_dir.mkdir(parents=True, exist_ok=True)
        mine = scenes[workers.rank::workers.world]
        tally = predict_scenes(cfg, loaded, predictor, mine, out_dir, cfg.progress and workers.rank == 0, layout)
        tallies = workers.gather(tally)
        if workers.rank != 0:
            return out_dir
        submission = write_submission_csv(cfg, scenes, out_dir) if cfg.submission else None
    partial = out_dir / PARTIAL
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    predicted = sum(len(t.predicted) for t in tallies)
    skipped = sum(len(t.skipped) for t in tallies)
    windows = sum(t.windows for t in tallies)
    seconds = max(t.seconds for t in tallies)
    summary = {"scenes": len(scenes), "predicted": predicted, "skipped_complete": skipped, "windows": windows,
               "seconds": round(seconds, 3), "scenes_per_s": predicted / max(seconds, 1e-9),
               "windows_per_s": windows / max(seconds, 1e-9), "processes": workers.world,
               "by_process": {str(r): t.predicted for r, t in enumerate(tallies)},
               "checkpoint": str(Path(loaded.checkpoint).resolve()),  # a relative ckpt= means nothing elsewhere
               "submission": str(submission) if submission else None}
    atomic_write_json(out_dir / "summary.json", summary)
    if submission:
        log.info("wrote %s (%d images)", submission, len(scenes))
    log.info("predicted %d scene(s), skipped %d complete, in %.1f s on %d process(es): %.2f scenes/s, "
             "%.1f windows/s; outputs in %s", predicted, skipped, seconds, workers.world,
             summary["scenes_per_s"], summary["windows_per_s"], out_dir)
    return out_dir


@hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base="1.3")
def hydra_main(cfg: DictConfig) -> Path:
    return task_wrapper(predict)(cfg)


main = with_config_hints(hydra_main, "predict")  # an unknown option or key: Hydra's message + a "did you mean", exit 2

if __name__ == "__main__":
    main()
