"""Outputs that carry their own meaning: the class COG holds its class names and colours (read by GDAL >= 3.12's
`gdalinfo` on the lone file, by rasterio, and by segplat without GDAL), stays a valid COG, and every scene gets a
STAC Item, every run folder a STAC Collection, both valid against the STAC schemas with no network.

GDAL 3.12 comes from pyogrio's wheel (rasterio's wheel has 3.10, which has no in-file class table); the STAC schemas
from pystac's wheel (core 1.1.0, projection v2.0.0, raster v1.1.0, classification v2.0.0).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds

from segplat.predict import predict
from segplat.predict.class_table import read_table
from tests.inference.checkpoints import CLASSES, PALETTE
from tests.inference.scenes import WINDOW, scene_arrays, two_grid_checkpoint, write_geotiffs
from tests.inference.test_predict_streaming import compose_predict

# `gdalinfo FILE` through GDAL's own GDALInfo() of the libgdal in pyogrio's wheel, in a process of its own
GDALINFO_312 = """
import ctypes, glob, os, sys
import pyogrio
lib = glob.glob(os.path.join(os.path.dirname(pyogrio.__file__), "..", "pyogrio.libs", "libgdal*"))[0]
g = ctypes.CDLL(lib)
g.GDALAllRegister()
g.GDALVersionInfo.restype = ctypes.c_char_p
g.GDALOpenEx.restype = ctypes.c_void_p
g.GDALOpenEx.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
g.GDALInfoOptionsNew.restype = ctypes.c_void_p
g.GDALInfoOptionsNew.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
g.GDALInfo.restype = ctypes.c_char_p
g.GDALInfo.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
handle = g.GDALOpenEx(sys.argv[1].encode(), 0x02, None, None, None)
assert handle, sys.argv[1]
print("GDAL", g.GDALVersionInfo(b"RELEASE_NAME").decode())
print(g.GDALInfo(handle, g.GDALInfoOptionsNew(None, None)).decode())
"""


def gdalinfo_312(path: Path) -> str:
    pytest.importorskip("pyogrio", reason="pyogrio (GDAL >= 3.12 in its wheel) is a dev dependency")
    proc = subprocess.run([sys.executable, "-c", GDALINFO_312, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = proc.stdout.split("\n", 1)[0].split()[1]
    if tuple(int(v) for v in version.split(".")[:2]) < (3, 12):
        pytest.skip(f"pyogrio's GDAL is {version}; the in-file class table needs GDAL >= 3.12")
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Two georeferenced two-modality scenes predicted with probabilities and previews."""
    root = tmp_path_factory.mktemp("stac")
    ckpt = two_grid_checkpoint(root / "two_grids.ckpt")
    for i, (h, w) in enumerate([(202, 170), (131, 97)]):
        write_geotiffs(root / "scenes", scene_arrays(h, w, seed=i + 1), stem=f"tile_{i}", by_folder=True)
    out = root / "out"
    predict(compose_predict([f"ckpt={ckpt}", f"input={root / 'scenes'}", f"window={WINDOW}",
                             "probabilities=uint8", "output.blocksize=64", "progress=false"], out))
    return {"root": root, "out": out, "ckpt": ckpt, "scenes": root / "scenes"}


@pytest.mark.slow  # starts a process (GDAL 3.12 beside rasterio's 3.10)
def test_a_lone_class_cog_holds_its_class_names_and_colours(run, tmp_path: Path):
    alone = tmp_path / "alone" / "tile_0_classes.tif"
    alone.parent.mkdir()
    shutil.copy(run["out"] / "tile_0_classes.tif", alone)  # no .aux.xml beside it
    info = gdalinfo_312(alone)
    table = info[info.index("<GDALRasterAttributeTable"):info.index("</GDALRasterAttributeTable>")]
    for i, (name, colour) in enumerate(zip(CLASSES, PALETTE)):
        assert f"<F>{i}</F>\n    <F>{name}</F>\n    <F>{colour[0]}</F>\n    <F>{colour[1]}</F>" in table
    assert 'usageAsString="Name"' in table and 'usageAsString="Red"' in table
    assert "Color Table" in info and "NoData Value=255" in info
    assert not list(alone.parent.glob("*.aux.xml")), "reading must not need (or write) a sidecar"

    # without GDAL: the table read from the TIFF tag; with rasterio's GDAL 3.10: colours, names tag, no stray item
    assert [(r["value"], r["class"], (r["red"], r["green"], r["blue"])) for r in read_table(alone)] == \
        [(i, c, tuple(p)) for i, (c, p) in enumerate(zip(CLASSES, PALETTE))]
    with rasterio.open(alone) as src:
        assert src.tags(1)["classes"] == ",".join(CLASSES) and "SEGPLAT_CLASS_TABLE" not in src.tags(1)
        assert [src.colormap(1)[i][:3] for i in range(len(CLASSES))] == [tuple(p) for p in PALETTE]
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        classes = src.read(1)
    with rasterio.open(run["out"] / "tile_0_classes.tif") as src:
        assert np.array_equal(src.read(1), classes)


def test_class_cogs_stay_valid_cogs(run):
    cog = pytest.importorskip("rio_cogeo.cogeo", reason="rio-cogeo is a dev dependency")
    for path in sorted(run["out"].glob("*_classes.tif")) + sorted(run["out"].glob("*_probs.tif")):
        valid, errors, warnings = cog.cog_validate(str(path), strict=True)
        assert valid and not errors and not warnings, (path.name, errors, warnings)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must find every schema locally: any network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a schema was fetched from the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_items_and_collection_are_valid_stac_and_say_what_the_files_hold(run, offline):
    pystac = pytest.importorskip("pystac", reason="pystac is a dev dependency")
    out = run["out"]
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    assert collection.validate()  # the schemas it was checked against
    items = {}
    for stem, (h, w) in (("tile_0", (202, 170)), ("tile_1", (131, 97))):
        item = pystac.Item.from_file(str(out / f"{stem}_item.json"))
        schemas = item.validate()
        assert any("projection/v2.0.0" in s for s in schemas) and any("classification/v2.0.0" in s for s in schemas)
        items[stem] = item
        raw = json.loads((out / f"{stem}_item.json").read_text())
        props = raw["properties"]
        src_path = run["scenes"] / "rgb" / f"{stem}.tif"
        with rasterio.open(src_path) as src, rasterio.open(out / f"{stem}_classes.tif") as pred:
            assert props["proj:code"] == "EPSG:32632" and props["proj:shape"] == [h, w]
            assert props["proj:transform"] == list(pred.transform)[:6] == list(src.transform)[:6]
            west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
            classes = pred.read(1)
        assert raw["bbox"] == pytest.approx([west, south, east, north], abs=1e-5)
        # every asset is a file beside the Item; the classes with names, colours and true pixel counts
        for asset in raw["assets"].values():
            assert (out / asset["href"]).is_file()
        band = raw["assets"]["classes"]["raster:bands"][0]
        assert band["nodata"] == 255 and band["data_type"] == "uint8"
        listed = {c["value"]: c for c in band["classification:classes"]}
        assert [listed[i]["title"] for i in range(len(CLASSES))] == list(CLASSES)
        assert [listed[i]["color_hint"] for i in range(len(CLASSES))] == ["000000", "FF0000", "00FF00", "FFFF00"]
        assert {v: c["count"] for v, c in listed.items()} == {v: int((classes == v).sum()) for v in listed}
        assert listed[255]["nodata"] and sum(c["count"] for c in listed.values()) == h * w
        probs = raw["assets"]["probabilities"]["raster:bands"]
        assert [b["name"] for b in probs] == list(CLASSES) and probs[0]["scale"] == pytest.approx(1 / 254)
        # provenance: the inputs, the checkpoint and its run, the settings
        derived = [link["href"] for link in raw["links"] if link["rel"] == "derived_from"]
        assert derived == [(run["scenes"] / m / f"{stem}.tif").resolve().as_uri() for m in ("rgb", "coarse")]
        assert props["segplat:checkpoint"] == str(run["ckpt"].resolve()) and props["segplat:window"] == WINDOW
        assert raw["collection"] == collection.id
    linked = sorted(link.href for link in collection.links if link.rel == "item")
    assert [Path(h).name for h in linked] == ["tile_0_item.json", "tile_1_item.json"]
    box = collection.extent.spatial.bboxes[0]
    assert box == [min(i.bbox[0] for i in items.values()), min(i.bbox[1] for i in items.values()),
                   max(i.bbox[2] for i in items.values()), max(i.bbox[3] for i in items.values())]


def test_an_item_without_georeference_is_valid_with_a_null_geometry(tmp_path: Path, offline):
    pystac = pytest.importorskip("pystac", reason="pystac is a dev dependency")
    from tests.inference.checkpoints import write_checkpoint
    from tests.inference.scenes import SPECS

    arrays = scene_arrays(70, 66)
    rgb = tmp_path / "plain.tif"
    with warnings.catch_warnings():  # the test's own raster has no georeference, on purpose
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(rgb, "w", driver="GTiff", height=70, width=66, count=3, dtype="uint16") as dst:
            dst.write(arrays["rgb"])
    ckpt = write_checkpoint(tmp_path / "rgb.ckpt", {"rgb": SPECS["rgb"]})
    out = tmp_path / "out"
    predict(compose_predict([f"ckpt={ckpt}", f"input={rgb}", f"window={WINDOW}", "progress=false"], out))
    item = json.loads((out / "plain_item.json").read_text())
    assert item["geometry"] is None and "bbox" not in item and item["properties"]["proj:code"] is None
    assert pystac.Item.from_file(str(out / "plain_item.json")).validate()
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    assert collection.validate() and collection.extent.spatial.bboxes == [[-180.0, -90.0, 180.0, 90.0]]
