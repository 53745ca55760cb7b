"""`python -m segplat.predict ckpt=RUN input=...`: sliding-window prediction of whole scenes.

Outputs per scene, in the run folder: `<name>_classes.tif` (class indices, the input's CRS,
transform and size, nodata 255 where every modality is nodata) or `<name>_classes.png` for
inputs without georeferencing, optional `<name>_probs.tif`, a colour PNG with the dataset's
palette and an overlay on the primary modality; for the clouds competition, `submission.csv`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from segplat.errors import ConfigError, DataError
from segplat.inference import LoadedModel, SlidingWindowPredictor, colourise, load_for_inference, overlay, preview_rgb
from segplat.utils.task import CONF_DIR, run_dir_of, task_wrapper, with_config_hints

log = logging.getLogger("segplat")
NODATA_CLASS = 255


def read_geotiff(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    import rasterio

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"input file {p} does not exist; check the input= path.")
    try:
        with rasterio.open(p) as src:
            return src.read(), {"crs": src.crs, "transform": src.transform, "nodata": src.nodata,
                                "width": src.width, "height": src.height, "bounds": src.bounds, "path": str(p)}
    except rasterio.errors.RasterioIOError as err:
        raise DataError(f"{p} could not be read as a raster ({err}); check the file.") from err


def check_scene_alignment(profiles: Mapping[str, dict[str, Any]], loaded: LoadedModel) -> None:
    """Modalities of one scene must share the CRS and the extent; their sizes must follow the model's scales."""
    names = list(profiles)
    first = profiles[names[0]]
    for m in names[1:]:
        p = profiles[m]
        if (p["crs"] is None) != (first["crs"] is None) or (p["crs"] is not None and p["crs"] != first["crs"]):
            raise DataError(f"{p['path']} is in {p['crs']} but {first['path']} is in {first['crs']}; reproject the "
                            "modalities of a scene to one CRS.")
        if first["crs"] is not None:
            tol = abs(first["transform"].a)
            if any(abs(a - b) > tol for a, b in zip(p["bounds"], first["bounds"])):
                raise DataError(f"{p['path']} covers {tuple(round(v, 3) for v in p['bounds'])} but {first['path']} "
                                f"covers {tuple(round(v, 3) for v in first['bounds'])}; crop them to one extent.")
    primary = loaded.modalities[0]
    for m in names:
        spec = loaded.specs[m]
        want = (round(profiles[primary]["height"] * spec.scale), round(profiles[primary]["width"] * spec.scale))
        have = (profiles[m]["height"], profiles[m]["width"])
        if have != want:
            raise DataError(f"{profiles[m]['path']} is {have[0]}x{have[1]} pixels but the model expects {want[0]}x"
                            f"{want[1]} for {m} next to {profiles[primary]['path']}; resample it to the trained grid.")


def nodata_mask(arrays: Mapping[str, np.ndarray], loaded: LoadedModel, profiles: Mapping[str, dict] | None,
                shape: tuple[int, int]) -> np.ndarray:
    """True where every modality is nodata, on the primary grid."""
    from segplat.data.store import _nodata_mask, _resize_nearest_mask

    all_nodata = np.ones(shape, bool)
    for m, a in arrays.items():
        nodata = loaded.specs[m].nodata
        if profiles is not None and profiles[m].get("nodata") is not None:
            nodata = profiles[m]["nodata"]
        all_nodata &= _resize_nearest_mask(_nodata_mask(a, nodata), shape) if nodata is not None or \
            np.issubdtype(a.dtype, np.floating) else np.zeros(shape, bool)
    return all_nodata


def iter_scenes(cfg: DictConfig, loaded: LoadedModel) -> Iterator[tuple[str, dict[str, np.ndarray], dict | None]]:
    """(name, arrays per modality, georeference or None) for every scene the input names."""
    inp = cfg.input
    if isinstance(inp, DictConfig):
        paths = OmegaConf.to_container(inp, resolve=True)
        unknown = [m for m in paths if m not in loaded.specs]
        if unknown:
            raise ConfigError(f"input names modalities {unknown} the model does not take; it takes "
                              f"{loaded.modalities}.")
        missing = [m for m in loaded.modalities if m not in paths]
        if missing:
            raise ConfigError(f"input lacks modality {missing[0]!r}; give input.{missing[0]}=FILE for each of "
                              f"{loaded.modalities}.")
        arrays, profiles = {}, {}
        for m in loaded.modalities:
            arrays[m], profiles[m] = read_geotiff(paths[m])
        check_scene_alignment(profiles, loaded)
        name = Path(paths[loaded.modalities[0]]).stem
        yield name, arrays, profiles
        return
    path = Path(str(inp)).expanduser()
    if path.is_file():
        if len(loaded.modalities) != 1:
            raise ConfigError(f"input={path} is one file but the model takes {loaded.modalities}; give "
                              "input={" + ",".join(f"{m}: FILE" for m in loaded.modalities) + "}.")
        array, profile = read_geotiff(path)
        yield path.stem, {loaded.modalities[0]: array}, {loaded.modalities[0]: profile}
        return
    if not path.is_dir():
        raise ConfigError(f"input={inp} is neither a file, a folder nor a mapping of modality files.")
    layout_cfg = OmegaConf.select(loaded.config, "dataset.layout")
    if layout_cfg is None:
        raise ConfigError(f"the checkpoint {loaded.checkpoint} has no dataset layout to read {path} with.")
    layout = hydra.utils.instantiate(layout_cfg, root=str(path))
    splits = layout.scan()
    if cfg.split not in splits:
        raise ConfigError(f"split={cfg.split} is not in {path}; it has {', '.join(splits)}.")
    for ref in splits[cfg.split]:
        sample = layout.read(ref)
        arrays = {m: sample.arrays[m] for m in loaded.modalities}
        geo = None
        if sample.crs is not None and sample.transform is not None:
            from affine import Affine

            geo = {m: {"crs": sample.crs, "transform": Affine(*sample.transform[:6]), "nodata": None}
                   for m in loaded.modalities}
        first_file = next(iter(ref.files.values()), None) if ref.files else None
        yield (Path(first_file).name if first_file else ref.id), arrays, geo


def write_outputs(out_dir: Path, name: str, probs: np.ndarray, arrays: Mapping[str, np.ndarray], loaded: LoadedModel,
                  geo: Mapping[str, dict] | None, save_probs: bool) -> np.ndarray:
    primary = loaded.modalities[0]
    h, w = probs.shape[-2:]
    classes = probs.argmax(0).astype(np.uint8)
    empty = nodata_mask(arrays, loaded, geo, (h, w))
    classes[empty] = NODATA_CLASS
    stem = Path(name).stem
    profile = geo[primary] if geo is not None else None
    if profile is not None and profile.get("crs") is not None:
        import rasterio

        meta = {"driver": "GTiff", "height": h, "width": w, "crs": profile["crs"], "transform": profile["transform"],
                "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
        if h < 256 or w < 256:
            meta.pop("tiled"), meta.pop("blockxsize"), meta.pop("blockysize")
        with rasterio.open(out_dir / f"{stem}_classes.tif", "w", count=1, dtype="uint8", nodata=NODATA_CLASS,
                           **meta) as dst:
            dst.write(classes, 1)
            dst.update_tags(1, classes=",".join(loaded.classes))
        if save_probs:
            p = probs.astype(np.float32)
            p[:, empty] = np.nan
            with rasterio.open(out_dir / f"{stem}_probs.tif", "w", count=p.shape[0], dtype="float32", nodata=np.nan,
                               **meta) as dst:
                dst.write(p)
                for i, c in enumerate(loaded.classes):
                    dst.set_band_description(i + 1, c)
    else:
        cv2.imwrite(str(out_dir / f"{stem}_classes.png"), classes)
        if save_probs:
            np.save(out_dir / f"{stem}_probs.npy", probs.astype(np.float16))
    colour = colourise(classes, loaded.palette, NODATA_CLASS)
    cv2.imwrite(str(out_dir / f"{stem}_colour.png"), colour[..., ::-1])
    image = preview_rgb(arrays[primary], loaded.specs[primary])
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(out_dir / f"{stem}_overlay.png"), overlay(image, colour)[..., ::-1])
    return classes


def predict(cfg: DictConfig) -> Path:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_for_inference(cfg.ckpt, device=device)
    predictor = SlidingWindowPredictor(loaded, window=cfg.window, overlap=cfg.overlap, batch_size=cfg.batch_size,
                                       flips=cfg.tta.flips, scales=list(cfg.tta.scales), device=device,
                                       progress=cfg.progress)
    out_dir = run_dir_of(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    scenes = iter_scenes(cfg, loaded)
    for i, (name, arrays, geo) in enumerate(tqdm(scenes, desc="scenes", disable=not cfg.progress, unit="scene")):
        if cfg.limit is not None and i >= cfg.limit:
            break
        probs = predictor.predict(arrays, desc=name)
        classes = write_outputs(out_dir, name, probs, arrays, loaded, geo, cfg.probabilities)
        rows.append((name, np.where(classes == NODATA_CLASS, 0, classes)))
    if cfg.submission:
        if cfg.submission not in ("clouds", "clouds_per_class"):
            raise ConfigError(f"submission={cfg.submission} is not known; use clouds or clouds_per_class.")
        from segplat.submission import write_submission

        path = write_submission(rows, out_dir / "submission.csv", per_class=cfg.submission == "clouds_per_class")
        log.info("wrote %s (%d images)", path, len(rows))
    log.info("predicted %d scene(s) into %s", len(rows), out_dir)
    return out_dir


@hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base="1.3")
def hydra_main(cfg: DictConfig) -> Path:
    return task_wrapper(predict)(cfg)


main = with_config_hints(hydra_main, "predict")  # an unknown option or key: Hydra's message + a "did you mean", exit 2

if __name__ == "__main__":
    main()
