"""`python -m segplat.data.inspect`: plots and a summary that agree with the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segplat.data.fake.clouds import write_fake as write_clouds
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_histograms_count_only_the_stores_valid_pixels_and_go_under_logs(tmp_path: Path, monkeypatch) -> None:
    """Scenes smaller than the tile: the padding around them is neither a histogram value nor `valid`."""
    root = write_clouds(tmp_path / "clouds", num_train=7, num_test=0)
    monkeypatch.setenv("SEGPLAT_LOG_DIR", str(tmp_path / "logs"))
    assert main(["dataset=clouds", f"dataset.root={root}", "dataset.tile_size=128", "dataset.patch_size=128",
                 "dataset.layout.val_fraction=0", "trainer.progress=false", "run_name=look", "num=7"]) == 0
    out = tmp_path / "logs" / "inspect" / "look"
    summary = json.loads((out / "summary.json").read_text())
    store = PatchStore(summary["store"])
    windows = [store.tiles_meta("train")[i]["window"] for i in summary["patches"]]
    inside = sum(h * w for _, _, h, w in windows)
    assert all(h * w < 128 * 128 for _, _, h, w in windows) and len(windows) == 7
    assert summary["modalities"]["rgb"]["bands"]["red"]["valid"] == inside  # not 7 x 128^2
    group = store.split("train")
    red = np.concatenate([np.asarray(group["rgb"][i])[0, :h, :w].ravel()
                          for i, (_, _, h, w) in zip(summary["patches"], windows)]).astype(np.float64)
    assert summary["modalities"]["rgb"]["bands"]["red"]["mean"] == pytest.approx(red.mean())
    assert summary["modalities"]["nir"]["bands"]["nir"]["valid"] == inside
    assert (out / "histograms_rgb.png").stat().st_size > 1000
    # the class counts leave the padding out too (it was counted as <ignore>): all 7 tiles were picked
    assert sum(summary["class_pixels"].values()) == inside


@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_help_typos_and_bad_own_keys_are_one_line_not_a_traceback(capsys) -> None:
    assert main(["--help"]) == 0 and "per-band" in capsys.readouterr().out
    assert main(["dataset=synthetic", "dataset.tile_sise=64"]) == 2
    assert capsys.readouterr().err.strip().endswith("did you mean dataset.tile_size? (add keys on purpose with "
                                                    "+dataset.tile_sise=...)")
    for bad in ("num=0", "num=many", "seed=-1"):
        assert main(["dataset=synthetic", bad]) == 2
        assert capsys.readouterr().err.startswith(f"error: {bad} must be a whole number")
