"""The predict task: check the config, load the checkpoint, list the scenes, predict each once, write the summary."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from annotated_types import Ge, MinLen, Predicate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from segplat.config import CheckpointTask, check_values
from segplat.errors import ConfigError
from segplat.inference import (
    LoadedModel,
    SlidingWindowPredictor,
    load_for_inference,
)
from segplat.predict import stac
from segplat.predict.group import Workers
from segplat.predict.scenes import Scene, build_layout, layout_split, list_scenes, open_scene, read_class_raster
from segplat.predict.writer import NODATA_CLASS, PARTIAL, UINT8_PROBABILITY_SCALE, OutputFiles, SceneWriter
from segplat.schema import Hint, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt, section
from segplat.utils.io import atomic_write_json
from segplat.utils.plain import to_plain
from segplat.utils.task import remove_if_no_results, run_dir_of

log = logging.getLogger("segplat")


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


@section
class TTASettings:
    """`tta`: test-time augmentation, averaged over every flip and scale."""

    flips: bool = False
    scales: Annotated[list[PositiveFloat], MinLen(1), Hint("resize factors of the scene; 1.0 = as trained")] = \
        field(default_factory=lambda: [1.0])


@section
class OutputSettings:
    """`output`: how the Cloud-Optimized GeoTIFFs and previews are written."""

    compress: Literal["deflate", "zstd", "lzw", "none"] = "deflate"
    blocksize: Annotated[int, Ge(16), Predicate(_power_of_two),
                         Hint("a power of two, e.g. 512: the GeoTIFFs' tile size")] = 512
    preview_size: Annotated[NonNegativeInt, Hint("pixels on the previews' long side; 0: no previews")] = 2048


@section
class PredictTask(CheckpointTask):
    """The keys of `python -m segplat.predict` (conf/predict.yaml), checked by `check_predict_config`."""

    input: Any = "???"  # a raster, a folder, a list file or modality -> path: read by segplat.predict.scenes
    split: str | None = None
    window: Annotated[PositiveInt | None, Hint("null: the training patch size")] = None
    overlap: OpenFraction = 0.25
    batch_size: Annotated[PositiveInt, Hint("windows per forward pass")] = 4
    tta: TTASettings = field(default_factory=TTASettings)
    probabilities: Annotated[Literal["uint8", "float16"] | None,
                             Hint(f"uint8 = probability x {UINT8_PROBABILITY_SCALE} in one byte per class, "
                                  "null = no probability rasters")] = None
    output: OutputSettings = field(default_factory=OutputSettings)
    gdal_cache_mb: Annotated[PositiveInt, Hint("megabytes of GDAL's block cache")] = 64
    submission: Literal["clouds", "clouds_per_class"] | None = None
    limit: Annotated[PositiveInt | None, Hint("scenes to predict; null = all")] = None
    dist_timeout: PositiveFloat = 86400.0


def check_predict_config(cfg: DictConfig) -> None:
    """Every key this task reads, checked before the checkpoint is loaded (the types by `check_values`)."""
    check_values(cfg, PredictTask)
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
                   out_dir: Path, show: bool, layout: Any = None, settings: dict[str, Any] | None = None) -> Tally:
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
                                         opened.gcps, stac.SceneSource.of(scene, settings or {}))
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
        settings = prediction_settings(cfg, loaded, predictor.window)
        workers.share(lambda: claim_run_folder(out_dir, settings))
        layout = None
        if any(not s.files for s in scenes):
            layout = build_layout(loaded, Path(str(cfg.input)).expanduser())
            layout.scan()
        out_dir.mkdir(parents=True, exist_ok=True)
        mine = scenes[workers.rank::workers.world]
        tally = predict_scenes(cfg, loaded, predictor, mine, out_dir, cfg.progress and workers.rank == 0, layout,
                               settings)
        tallies = workers.gather(tally)
        if workers.rank != 0:
            return out_dir
        stac.write_collection(out_dir, [s.stem for s in scenes], settings)
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
