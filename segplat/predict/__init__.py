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
nodata, the dataset palette as its colour table, the class names and colours as a raster attribute table inside
the file (GDAL_METADATA tag: GDAL >= 3.12 reads it; `segplat.predict.class_table.read_table` too), in the
`classes` tag, and as category names in `<stem>_classes.tif.aux.xml` (GDAL's sidecar, for older GDAL);
optional `<stem>_probs.tif` (`probabilities=uint8|float16`); `<stem>_colour.png` and `<stem>_overlay.png`
previews with a class legend (`output.preview_size`); `<stem>_item.json`, the scene's STAC Item, and
`collection.json`, the run folder's STAC Collection (docs/prediction.md); `summary.json`; for the clouds
competition, `submission.csv`. `<stem>` is the input's file name without its extension (`scene.v2.tif` -> `scene.v2`).

Many processes (`torchrun` / `accelerate launch`): rank 0 lists the scenes and shares the list; scene i is
predicted by rank i mod world size, so each scene is written by exactly one process. Every file is written
under `.partial/` and renamed into place, the class raster last: a scene whose outputs all exist is complete,
and running the same command with the same `run_name` again skips it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from segplat.predict.scenes import list_scenes
from segplat.predict.task import choose_device, predict, run_prediction
from segplat.utils.task import CONF_DIR, task_wrapper, with_config_hints

__all__ = ["choose_device", "list_scenes", "main", "predict", "run_prediction"]


# defined here so that Hydra names the job (and its log file) after the task: predict.log
@hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base="1.3")
def hydra_main(cfg: DictConfig) -> Path:
    return task_wrapper(predict)(cfg)


main = with_config_hints(hydra_main, "predict")  # an unknown option or key: Hydra's message + a "did you mean", exit 2
