"""benchmarks/gfm_comparison.py: one row per run folder, the metrics of the best epoch, water first, a plot."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gfm_comparison.py"


def write_run(folder: Path, encoder: dict, decoder: str, modalities: list[str], records: list[dict] | None,
              best_epoch: int = 1, params: int = 1_000_000) -> Path:
    folder.mkdir(parents=True)
    cfg = {"model": {"_target_": "segplat.models.Segmenter", "encoder": encoder,
                     "decoder": {"_target_": f"segplat.models.decoders.{decoder}"}},
           "dataset": {"modalities": modalities}, "callbacks": {"monitor": "val/iou_water"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))  # Hydra's copy: not a second run
    if records is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = {"status": "finished", "best_epoch": best_epoch, "num_parameters": params,
                   "classes": ["dry", "water"], "miou": records[-1]["val/miou"]}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def record(epoch: int, dry: float, water: float, seconds: float) -> dict:
    return {"epoch": epoch, "val/iou_dry": dry, "val/iou_water": water, "val/miou": (dry + water) / 2,
            "train/seconds": seconds, "val/seconds": 1.0}


def test_table_takes_the_best_epoch_puts_water_first_and_lists_failed_runs(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "trial_0000", {"_target_": "segplat.models.encoders.gfm.TerraMindEncoder",
                                     "name": "terramind_v1_tiny"}, "UNetDecoder", ["s2", "s1"],
              [record(1, 0.8, 0.6, 10.0), record(2, 0.7, 0.2, 20.0)], best_epoch=1, params=8_400_000)
    write_run(sweep / "trial_0001", {"_target_": "segplat.models.encoders.TimmEncoder", "name": "resnet18"},
              "UNetDecoder", ["s1"], [record(1, 0.5, 0.3, 4.0)])
    write_run(sweep / "trial_0002", {"_target_": "segplat.models.encoders.gfm.PrithviEncoder",
                                     "name": "prithvi_eo_v2_300"}, "UNetDecoder", ["s2"], None)
    result = subprocess.run([sys.executable, str(SCRIPT), str(sweep)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader((sweep / "comparison.csv").open()))
    header, body = rows[0], rows[1:]
    assert header[:5] == ["model", "inputs", "IoU water", "IoU dry", "mIoU"]
    assert [(r[0], r[1]) for r in body] == [("U-Net resnet18", "s1"), ("Prithvi prithvi_eo_v2_300", "s2"),
                                            ("TerraMind terramind_v1_tiny", "s2+s1")]
    tm = body[2]
    assert tm[2:5] == ["0.6000", "0.8000", "0.7000"]  # epoch 1 (the best), not the last
    assert tm[header.index("params (M)")] == "8.40" and tm[header.index("train s/epoch")] == "15.0"
    assert tm[header.index("best epoch / epochs")] == "1 / 2"
    assert body[1][2] == "-" and "no summary.json" in body[1][header.index("status")]
    assert (sweep / "comparison.png").stat().st_size > 10_000
    assert "| TerraMind terramind_v1_tiny | s2+s1 | 0.6000 |" in (sweep / "comparison.md").read_text()


def test_no_run_folder_is_one_sentence(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no run folder (with config.yaml)" in result.stderr
