"""benchmarks/gpu: the one-script GPU run works end to end on CPU (--dry-run), and its pieces are right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.gpu.bench import VARIANTS, bf16_peak_tflops, torch_preprocess, workers_needed
from segplat.data.layouts.base import ModalitySpec
from segplat.data.preprocess import PhotometricAugment, Preprocessor

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.bench", "--dry-run", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "gpu.json").read_text())
    assert data["status"].startswith("dry run on CPU") and "not GPU figures" in data["status"]
    assert data["bf16_peak_tflops"] is None and data["mfu_note"]
    s = data["sections"]
    # preprocessing: NumPy is the reference; the torch transcription agrees to 1e-6; no CuPy without CUDA
    paths = s["preprocess"]["paths"]
    assert paths["numpy (CPU)"]["ms"] > 0
    assert paths["torch (CPU)"]["equal"] == "yes" and paths["torch (CPU)"]["max_scaled_diff"] <= 1e-6
    assert "not measured" in paths["cupy (GPU)"]["note"]
    assert [r["workers"] for r in s["loader"]["rates"]] == [0, 1]
    assert all(r["patches_per_s"] > 0 and r["patches"] > 0 for r in s["loader"]["rates"])
    assert set(s["flops"]) == {"unet", "segformer_b2", "cmx_b2"}
    for f in s["flops"].values():
        assert f["forward_gflops"] > 0 and f["train_gflops"] == pytest.approx(3 * f["forward_gflops"])
    # every planned setting is reported: measured, or skipped with the reason; none failed
    steps = s["steps"]
    assert {(r["model"], r["variant"]) for r in steps} == {(m, v) for m in s["flops"] for v in VARIANTS}
    assert not [r for r in steps if r.get("error")], [r for r in steps if r.get("error")]
    measured = [r for r in steps if "img_s" in r]
    assert {r["variant"] for r in measured} >= {"eager", "channels_last"}
    assert all(r["img_s"] > 0 and r["ms_step"] > 0 and "mfu_pct" not in r for r in measured)
    assert all(r["skipped"].startswith("skipped: ") for r in steps if "img_s" not in r)
    assert {r["model"] for r in s["loader_vs_step"]} == set(s["flops"])
    (e2e,) = s["end_to_end"]
    assert e2e["steps_counted"] > 0 and e2e["wait_pct"] is not None and e2e["img_s"] > 0
    # prediction: segplat's sliding-window stream and the bare forward, both measured, for the default and CMX
    assert [r["model"] for r in s["predict"]] == ["unet", "cmx_b2"]
    assert all(r["windows"] > 0 and r["predict_windows_s"] > 0 and r["forward_windows_s"] > 0 and "error" not in r
               for r in s["predict"]), s["predict"]
    md = (out / "gpu.md").read_text()
    assert md.startswith("# GPU run: dry run on CPU")
    for heading in ("## Training step", "## Preprocessing", "## CPU loader", "## Workers needed", "## End to end",
                    "## Model FLOPs", "## Prediction"):
        assert heading in md


def test_bf16_peaks_by_device_name() -> None:
    assert bf16_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert bf16_peak_tflops("NVIDIA H200 NVL") == pytest.approx(835.5)
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.5)
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312)
    assert bf16_peak_tflops("NVIDIA L40S") == pytest.approx(362.05)
    assert bf16_peak_tflops("NVIDIA L40") == pytest.approx(181.05)
    assert bf16_peak_tflops("NVIDIA L4") == pytest.approx(121)
    assert bf16_peak_tflops("NVIDIA A10") == pytest.approx(125)
    for unknown in ("NVIDIA A10G", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 3090"):
        assert bf16_peak_tflops(unknown) is None  # MFU is then omitted, and the report says why


@pytest.mark.parametrize("nodata", [None, 0])
def test_torch_transcription_matches_the_preprocessor(nodata: int | None) -> None:
    specs = {"rgb": ModalitySpec(("r", "g", "b"), nodata=nodata), "nir": ModalitySpec(("n",), nodata=nodata)}
    stats = {"rgb": {"mean": [90.0, 100.0, 110.0], "std": [30.0, 35.0, 40.0], "p2": [10.0, 12.0, 14.0],
                     "p98": [200.0, 210.0, 220.0]},
             "nir": {"mean": [120.0], "std": [50.0], "p2": [5.0], "p98": [240.0]}}
    pre = Preprocessor(specs, stats, ["rgb", "nir"], PhotometricAugment(brightness=0.2, contrast=0.3, p=1.0), seed=3)
    g = torch.Generator().manual_seed(0)
    batch = {"rgb": torch.randint(0, 256, (3, 3, 40, 40), generator=g, dtype=torch.uint8),
             "nir": torch.randint(0, 256, (3, 1, 40, 40), generator=g, dtype=torch.uint8)}
    for train in (True, False):
        ref = pre(batch, train=train, epoch=2, step=5)
        got = torch_preprocess(pre, batch, train, 2, 5)
        for m in ref:  # to 1e-6, relative above 1 (float32: a few units in the last place at |x| ~ 5)
            assert ((got[m] - ref[m]).abs() <= 1e-6 * ref[m].abs().clamp(min=1)).all()
            if nodata is not None:
                assert (got[m][batch[m] == nodata] == 0).all()
    # the photometric draw changes the result: the comparison is not between two identities
    assert not torch.allclose(torch_preprocess(pre, batch, True, 2, 5)["rgb"], pre(batch)["rgb"], atol=1e-3)


def test_torch_transcription_refuses_ops_it_does_not_cover() -> None:
    specs = {"rgb": ModalitySpec(("r", "g", "b"))}
    stats = {"rgb": {"mean": [1.0] * 3, "std": [1.0] * 3}}
    pre = Preprocessor(specs, stats, ["rgb"], PhotometricAugment(gamma=0.2))
    with pytest.raises(ValueError, match="brightness and contrast only"):
        torch_preprocess(pre, {"rgb": torch.zeros(1, 3, 8, 8, dtype=torch.uint8)}, True, 0, 0)


def test_workers_needed_measured_or_extrapolated() -> None:
    rates = [{"workers": 1, "patches_per_s": 100.0, "per_worker": 100.0},
             {"workers": 2, "patches_per_s": 190.0, "per_worker": 95.0},
             {"workers": 4, "patches_per_s": 360.0, "per_worker": 90.0}]
    assert workers_needed(rates, 150.0)[0] == 2
    assert workers_needed(rates, 90.0)[0] == 1
    need, how = workers_needed(rates, 1000.0)
    assert need == int(np.ceil(1000 / 90)) and "extrapolated" in how
