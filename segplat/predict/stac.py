"""STAC metadata of a prediction: one Item beside each scene's outputs, one Collection for the run folder.

Plain JSON (STAC 1.1.0 with the projection v2.0.0, raster v1.1.0 and classification v2.0.0 extensions), written
without a STAC library. An Item says where the scene lies (footprint in WGS 84, `proj:*` of the class raster), what
each asset holds (`raster:bands` with data type, nodata and scale; the classes with their names, colours and pixel
counts), and where it came from: the input files (`derived_from` links), the checkpoint and the training run, the
prediction settings (`segplat:*` properties). Hrefs are relative, so a run folder can be moved or uploaded whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segplat.utils.io import atomic_write_json

STAC_VERSION = "1.1.0"
PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
CLASSIFICATION = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
GEOTIFF = "image/tiff; application=geotiff"
COLLECTION_FILE = "collection.json"
ITEM_SUFFIX = "_item.json"
EDGE_POINTS = 16  # points per raster edge in the WGS 84 footprint (edges curve under reprojection)
WHOLE_EARTH = [-180.0, -90.0, 180.0, 90.0]


@dataclass(frozen=True)
class SceneSource:
    """What a scene's Item says it came from: the files read and the prediction's settings."""

    inputs: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scene: Any, settings: Mapping[str, Any]) -> SceneSource:
        """A raster scene's files, or the files a dataset layout's sample is read from."""
        files = [p for _, p in scene.files] or [str(p) for p in (scene.ref.files.values() if scene.ref else ())]
        return cls(tuple(files), settings)

    @property
    def collection(self) -> str:
        return collection_id(self.settings)


def collection_id(settings: Mapping[str, Any]) -> str:
    """The same for every process and every run with these settings (checkpoint, input, window, outputs)."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"segplat-prediction-{digest}"


def class_name(name: str) -> str:
    """A class name as the classification extension allows it (letters, digits, - and _)."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or "class"


def classes_field(classes: Sequence[str], palette: Sequence[Sequence[int]], counts: np.ndarray | None,
                  nodata: int) -> list[dict[str, Any]]:
    """`classification:classes` of a class raster: value, name, title, colour, pixel count and share; nodata last."""
    total = int(counts[:len(classes)].sum()) if counts is not None else 0
    out = []
    for i, name in enumerate(classes):
        entry: dict[str, Any] = {"value": i, "name": class_name(name), "title": name,
                                 "color_hint": "".join(f"{int(v):02X}" for v in palette[i][:3])}
        if counts is not None:
            entry["count"] = int(counts[i])
            entry["percentage"] = round(100 * int(counts[i]) / total, 4) if total else 0.0
        out.append(entry)
    out.append({"value": nodata, "name": "nodata", "title": "no data (every input is nodata here)", "nodata": True,
                **({"count": int(counts[nodata])} if counts is not None else {})})
    return out


def footprint(crs: Any, transform: Any, height: int, width: int) -> tuple[dict[str, Any], list[float]]:
    """The raster's outline in WGS 84 (GeoJSON polygon) and its bbox."""
    from rasterio.warp import transform as reproject_points

    steps = np.linspace(0, 1, EDGE_POINTS, endpoint=False)
    cols = np.concatenate([steps * width, np.full_like(steps, width), (1 - steps) * width, np.zeros_like(steps)])
    rows = np.concatenate([np.zeros_like(steps), steps * height, np.full_like(steps, height), (1 - steps) * height])
    xs, ys = transform @ (cols, rows)
    lon, lat = reproject_points(crs, "EPSG:4326", list(xs), list(ys))
    ring = [[round(x, 7), round(y, 7)] for x, y in zip(lon, lat)]
    ring.append(ring[0])
    bbox = [min(p[0] for p in ring), min(p[1] for p in ring), max(p[0] for p in ring), max(p[1] for p in ring)]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


def acquired(inputs: Sequence[str], fallback: str | Path) -> tuple[str, str]:
    """(ISO time, where it came from): the primary input's TIFFTAG_DATETIME (taken as UTC) when it has one, else the
    newest modification time of the inputs (of the checkpoint when the inputs are no files): segplat is not told
    when a scene was acquired."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    files = [Path(p) for p in inputs if Path(p).is_file()]
    if files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(files[0]) as src:
                    stamp = src.tags().get("TIFFTAG_DATETIME")
        except RasterioIOError:
            stamp = None
        parsed = re.fullmatch(r"(\d{4}):(\d{2}):(\d{2}) (\d{2}:\d{2}:\d{2})", (stamp or "").strip())
        if parsed:
            y, m, d, hms = parsed.groups()
            return f"{y}-{m}-{d}T{hms}Z", f"TIFFTAG_DATETIME of {files[0].name}"
        newest = max(files, key=lambda p: p.stat().st_mtime)
        return iso(newest.stat().st_mtime), f"modification time of {newest.name}"
    return iso(Path(fallback).stat().st_mtime), f"modification time of {Path(fallback).name}"


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def training_run(checkpoint: Path) -> str:
    """The run folder a checkpoint belongs to (`RUN/checkpoints/best.ckpt` -> RUN), else the checkpoint itself."""
    checkpoint = checkpoint.resolve()
    return str(checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint)


def scene_item(stem: str, height: int, width: int, crs: Any, transform: Any, loaded: Any, counts: np.ndarray,
               assets: Mapping[str, str], probabilities: str | None, source: SceneSource, nodata: int,
               probability_scale: float) -> dict[str, Any]:
    """The STAC Item of one scene's outputs; `assets` maps classes / probabilities / colour / overlay / categories
    to their file names beside the Item."""
    georeferenced = crs is not None and transform is not None
    if georeferenced:
        from rasterio.crs import CRS

        crs = CRS.from_user_input(crs)  # a layout's sample may give it as text
    geometry, bbox = footprint(crs, transform, height, width) if georeferenced else (None, None)
    when, how = acquired(source.inputs, loaded.checkpoint)
    proj: dict[str, Any] = {"proj:shape": [height, width]}
    if georeferenced:
        epsg = crs.to_epsg()
        proj["proj:code"] = f"EPSG:{epsg}" if epsg else None
        if not epsg:
            proj["proj:wkt2"] = crs.to_wkt()
        proj["proj:transform"] = [float(v) for v in list(transform)[:6]]
        left, top = transform @ (0, 0)
        right, bottom = transform @ (width, height)
        proj["proj:bbox"] = [min(left, right), min(top, bottom), max(left, right), max(top, bottom)]
    else:
        proj["proj:code"] = None
    resolution = float(abs(transform.a)) if georeferenced else None
    band_common = {"spatial_resolution": resolution} if resolution else {}
    classes = classes_field(loaded.classes, loaded.palette, counts, nodata)
    out: dict[str, Any] = {
        "classes": {"href": f"./{assets['classes']}", "type": COG, "roles": ["data"],
                    "title": "class of each pixel (colour table and class table inside the file)",
                    "raster:bands": [{"name": "class", "data_type": "uint8", "nodata": nodata, "sampling": "area",
                                      **band_common, "classification:classes": classes}]},
    }
    if probabilities:
        band = ({"data_type": "uint8", "nodata": 255, "scale": probability_scale, "offset": 0.0}
                if probabilities == "uint8" else {"data_type": "float32", "bits_per_sample": 16, "nodata": "nan"})
        out["probabilities"] = {"href": f"./{assets['probabilities']}", "type": COG, "roles": ["data"],
                                "title": "class probabilities, one band per class",
                                "raster:bands": [{"name": c, "description": f"probability of {c}", **band,
                                                  **band_common} for c in loaded.classes]}
    if "colour" in assets:
        out["colour"] = {"href": f"./{assets['colour']}", "type": "image/png", "roles": ["overview", "visual"],
                         "title": "class map in the class colours with a legend"}
        out["overlay"] = {"href": f"./{assets['overlay']}", "type": "image/png", "roles": ["overview"],
                          "title": "class colours over the primary input, with a legend"}
    out["categories"] = {"href": f"./{assets['categories']}", "type": "application/xml", "roles": ["metadata"],
                         "title": "GDAL sidecar with the category names (for GDAL before 3.12)"}
    settings = source.settings
    properties = {
        "datetime": when,
        "segplat:datetime_source": how,
        **proj,
        "segplat:checkpoint": str(Path(loaded.checkpoint).resolve()),
        "segplat:training_run": training_run(Path(loaded.checkpoint)),
        "segplat:model": str(loaded.config.model.get("_target_", "")),
        "segplat:modalities": list(loaded.modalities),
        **{f"segplat:{k}": settings[k] for k in ("window", "overlap", "tta") if k in settings},
    }
    if not georeferenced:
        properties["segplat:georeference"] = "none: the input has none, so neither have the outputs or this Item"
    links = [{"rel": rel, "href": f"./{COLLECTION_FILE}", "type": "application/json"}
             for rel in ("collection", "parent", "root")]
    links += [{"rel": "derived_from", "href": Path(p).resolve().as_uri(), "type": GEOTIFF, "title": Path(p).name}
              for p in source.inputs]
    item: dict[str, Any] = {"type": "Feature", "stac_version": STAC_VERSION,
                            "stac_extensions": [PROJECTION, RASTER, CLASSIFICATION], "id": stem,
                            "geometry": geometry}
    if bbox is not None:
        item["bbox"] = bbox
    item.update({"properties": properties, "links": links, "assets": out, "collection": source.collection})
    return item


def write_collection(out_dir: Path, stems: Sequence[str], settings: Mapping[str, Any]) -> Path:
    """`collection.json` over the Items of `stems` on disk (this run's and earlier runs' in the same folder)."""
    items = [json.loads((out_dir / f"{s}{ITEM_SUFFIX}").read_text()) for s in stems
             if (out_dir / f"{s}{ITEM_SUFFIX}").is_file()]
    boxes = [i["bbox"] for i in items if i.get("bbox")]
    bbox = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
            if boxes else WHOLE_EARTH)
    times = sorted(i["properties"]["datetime"] for i in items)
    checkpoint = settings.get("checkpoint", "")
    collection = {
        "type": "Collection", "stac_version": STAC_VERSION, "stac_extensions": [], "id": collection_id(settings),
        "title": f"segplat predictions of {Path(str(checkpoint)).name}",
        "description": (f"Class maps predicted by segplat from {checkpoint} for {len(items)} scene(s) "
                        f"(window {settings.get('window')}, overlap {settings.get('overlap')})."
                        + ("" if boxes else " The inputs have no georeference: the extent is the whole Earth.")),
        "license": "other",
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [[times[0], times[-1]] if times
                                                                           else [None, None]]}},
        "links": [{"rel": "root", "href": f"./{COLLECTION_FILE}", "type": "application/json"}]
        + [{"rel": "item", "href": f"./{i['id']}{ITEM_SUFFIX}", "type": "application/geo+json"} for i in items],
    }
    return atomic_write_json(out_dir / COLLECTION_FILE, collection)
