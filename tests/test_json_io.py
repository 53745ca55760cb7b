"""Every JSON file segplat writes is strict JSON (NaN -> null) and reads back as before (null -> NaN)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import zarr

from segplat.data.layouts.base import ModalitySpec
from segplat.engine.loggers import JsonlLogger, RunInfo
from segplat.plots import plot_curves
from segplat.utils.io import atomic_write_json, dumps_json, loads_json, read_jsonl
from tests.conftest import REPO


def strict_loads(text: str):
    """A parser that, like jq or JavaScript's JSON.parse, refuses NaN / Infinity."""
    def refuse(token: str):
        raise ValueError(f"bare {token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinities_are_written_as_null_and_read_back_as_nan(tmp_path: Path) -> None:
    record = {"epoch": 2, "val/iou_thin_cloud": float("nan"), "val/miou": np.float32(0.5), "inf": float("inf"),
              "per_class": {"a": float("nan"), "b": 0.25}, "cm": np.array([[1, 2], [3, 4]]), "path": tmp_path}
    text = dumps_json(record)
    parsed = strict_loads(text)
    assert parsed["val/iou_thin_cloud"] is None and parsed["inf"] is None and parsed["per_class"]["a"] is None
    assert parsed["val/miou"] == 0.5 and parsed["cm"] == [[1, 2], [3, 4]] and parsed["path"] == str(tmp_path)
    back = loads_json(text, null_as_nan=True)
    assert math.isnan(back["val/iou_thin_cloud"]) and back["epoch"] == 2
    # files written before the fix (bare NaN) still read
    assert math.isnan(loads_json('{"val/miou": NaN}')["val/miou"])
    atomic_write_json(tmp_path / "summary.json", {"per_class_iou": {"shadow": float("nan")}})
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"per_class_iou": {"shadow": None}}


def test_metrics_jsonl_is_strict_and_plots_read_old_and_new_lines(tmp_path: Path) -> None:
    logger = JsonlLogger()
    logger.start(RunInfo(run_dir=tmp_path, name="t"))
    logger.log_metrics({"epoch": 1, "train/loss": 1.0, "val/loss": 0.9, "val/miou": 0.2, "val/iou_x": float("nan")}, 1)
    with open(tmp_path / "metrics.jsonl", "a") as fh:  # a line from an older run: bare NaN
        fh.write('{"epoch": 2, "train/loss": 0.8, "val/loss": 0.7, "val/miou": 0.3, "val/iou_x": NaN}\n')
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict_loads(lines[0])["val/iou_x"] is None
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and all(math.isnan(r["val/iou_x"]) for r in records)
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_store_attrs_are_strict_json_and_nan_nodata_survives(tmp_path: Path) -> None:
    spec = ModalitySpec(bands=("vv", "vh"), nodata=float("nan"), dtype="float32", optical=False)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    group.attrs["segplat"] = {"modalities": {"s1": spec.to_attrs()}}
    strict_loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    attrs = dict(zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs)["segplat"]["modalities"]["s1"]
    read = ModalitySpec.from_attrs(attrs)
    assert math.isnan(read.nodata) and read.bands == spec.bands and read.dtype == "float32"
    old = {**spec.to_attrs(), "nodata": float("nan")}  # what stores written before the fix hold
    assert math.isnan(ModalitySpec.from_attrs(old).nodata)
    assert ModalitySpec.from_attrs({**spec.to_attrs(), "nodata": None}).nodata is None


def test_json_files_are_written_through_the_strict_helper() -> None:
    """json.dumps outside segplat/utils/io.py only where no file is written or no float can be NaN."""
    allowed = {"segplat/utils/io.py", "segplat/data/layouts/base.py",  # the helper; a fingerprint hash
               "segplat/sweep/sweeper.py",  # the pruner spec in an environment variable
               "segplat/sweep/outputs.py",  # round-trips through atomic_write_json
               "segplat/data/fake/s1s2_series.py"}  # fake metadata.geojson: integers and strings only
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "segplat").rglob("*.py"))
    offenders = [m for m in modules if m not in allowed and re.search(r"json\.dumps?\(", (REPO / m).read_text())]
    assert offenders == [], f"{offenders} write JSON without segplat.utils.io.dumps_json"


def test_every_json_file_of_a_store_with_nan_nodata_is_strict(tmp_path: Path) -> None:
    from segplat.data.fake.sen1floods11 import write_fake
    from segplat.data.layouts.sen1floods11 import Sen1Floods11Layout
    from segplat.data.store import PatchStore, prepare_store

    root = write_fake(tmp_path / "raw", seed=1, per_split={"train": 2, "val": 1})
    path = prepare_store(Sen1Floods11Layout(str(root), splits=["train", "val"]), tmp_path / "s.zarr", 64,
                         progress=False)
    files = sorted(path.rglob("*.json"))
    assert len(files) > 5
    for f in files:
        strict_loads(f.read_text())
    assert math.isnan(PatchStore(path).modalities["s1"].nodata)  # the S1 nodata (NaN) survives as "nan"


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    """mkstemp's 0600 must not leak: checkpoints and summaries are read by other users of a shared disk."""
    import os

    from segplat.utils.io import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert os.stat(atomic).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
