"""`python -m segplat.data.inspect`: plots and a summary that agree with the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from segplat.data.fake.s1s2_series import write_fake
from segplat.data.inspect import main, parse_args
from segplat.data.store import PatchStore

SYNTHETIC = ["dataset=synthetic", "dataset.layout.num_train=6", "dataset.layout.num_val=2",
             "dataset.layout.scene_size=64", "dataset.tile_size=64", "trainer.progress=false"]


def test_parse_args_splits_own_keys_from_overrides() -> None:
    own, overrides = parse_args(["dataset=clouds", "out=/tmp/x", "dataset.root=/d", "num=3"])
    assert own == {"out": "/tmp/x", "num": "3"} and overrides == ["dataset=clouds", "dataset.root=/d"]


def test_inspect_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "insp"
    assert main([*SYNTHETIC, f"out={out}", "num=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for f in ("class_frequencies.png", "histograms_rgb.png", "histograms_nir.png", "patches_rgb.png",
              "patches_nir.png"):
        assert (out / f).stat().st_size > 1000, f
    store = PatchStore(summary["store"])
    labels = store.split("train")["label"][:]
    counts = np.bincount(labels.ravel(), minlength=4)
    assert [summary["class_pixels"][c] for c in store.classes] == counts[:4].tolist()
    band = summary["modalities"]["rgb"]["bands"]["red"]
    picked = store.split("train")["rgb"][summary["patches"]][:, 0]
    assert band["valid"] == picked.size and band["mean"] == float(picked.astype(np.float64).mean())


def test_inspect_series_plots_dates(tmp_path: Path) -> None:
    root = write_fake(tmp_path / "pastis", num_patches=10, size=32)
    out = tmp_path / "insp"
    assert main(["dataset=s1s2_series", f"dataset.root={root}", "dataset.tile_size=32", "dataset.patch_size=32",
                 "trainer.progress=false", f"out={out}", "num=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "series_s2.png").is_file() and (out / "series_s1.png").is_file()
    store = PatchStore(summary["store"])
    dates = store.split("train")["s2_dates"][summary["patches"]]
    assert summary["modalities"]["s2"]["dates_per_tile"] == (dates >= 0).sum(1).tolist()


def test_inspect_reports_a_missing_root(capsys) -> None:
    assert main(["dataset=s1s2_series", "dataset.root=/nonexistent/pastis"]) == 2
    assert "dataset.root" in capsys.readouterr().err
