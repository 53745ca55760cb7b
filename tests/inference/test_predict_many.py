"""Many scenes over many processes: each scene written by exactly one process, the same bytes as one process; a
killed job run again skips the scenes it finished and writes the rest (torchrun on CPU with gloo, as
tests/distributed does)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launch_utils import env_for
from tests.inference.scenes import WINDOW, scene_arrays, two_grid_checkpoint, write_geotiffs

pytestmark = pytest.mark.slow
STEMS = [f"tile_{i}" for i in range(6)]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    """Six two-modality scenes in modality folders, a checkpoint, and the outputs of one process over them."""
    root = tmp_path_factory.mktemp("many")
    for i, stem in enumerate(STEMS):
        write_geotiffs(root / "scenes", scene_arrays(512 - 6 * i, 500, seed=i), stem=stem, by_folder=True)
    ckpt = two_grid_checkpoint(root / "two_grids.ckpt")
    single = root / "single"
    proc = run_predict(predict_cmd(ckpt, root / "scenes", single), root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "ckpt": ckpt, "scenes": root / "scenes", "single": single}


def predict_cmd(ckpt: Path, scenes: Path, out: Path, nproc: int = 1) -> list[str]:
    args = ["-m", "segplat.predict", f"ckpt={ckpt}", f"input={scenes}", f"window={WINDOW}", "progress=false",
            "probabilities=uint8", f"hydra.run.dir={out}"]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", *args]


def run_predict(cmd: list[str], log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env_for(log_dir), capture_output=True, text=True, timeout=600)


def outputs(folder: Path) -> dict[str, bytes]:
    """Every prediction output (not Hydra's files, the run's summary or its settings), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in ("summary.json", "predict.log", "prediction.json")}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_two_processes_write_each_scene_once_with_the_same_bytes(job, tmp_path: Path):
    out = tmp_path / "two"
    proc = run_predict(predict_cmd(job["ckpt"], job["scenes"], out, nproc=2), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = summary(out)
    shares = result["by_process"]
    assert set(shares) == {"0", "1"} and result["processes"] == 2
    assert sorted(shares["0"] + shares["1"]) == STEMS and not set(shares["0"]) & set(shares["1"])
    assert shares["0"] and shares["1"]
    assert result["predicted"] == 6 and result["windows"] > 0 and result["windows_per_s"] > 0
    single, two = outputs(job["single"]), outputs(out)
    assert len(single) == 6 * 6 + 1  # classes, categories, probabilities, colour, overlay, STAC Item; the Collection
    assert single.keys() == two.keys()
    assert [name for name in single if single[name] != two[name]] == []
    assert not (out / ".partial").exists()
    lines = [line for line in proc.stdout.splitlines() if "scenes/s" in line]
    assert len(lines) == 1 and "predicted 6 scene(s), skipped 0 complete" in lines[0] and "windows/s" in lines[0]


def test_a_killed_job_resumes_without_recomputing_finished_scenes(job, tmp_path: Path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(predict_cmd(job["ckpt"], job["scenes"], out), env=env_for(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.glob("*_classes.tif"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name[:-len("_classes.tif")] for p in out.glob("*_classes.tif"))
    assert 2 <= len(finished) < 6, f"the kill did not land mid-job ({len(finished)} scenes finished)"
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()
              if p.is_file() and any(p.name.startswith(f"{stem}_") for stem in finished)}
    assert len(stamps) == 6 * len(finished)

    again = run_predict(predict_cmd(job["ckpt"], job["scenes"], out), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    result = summary(out)
    assert result["skipped_complete"] == len(finished) and result["predicted"] == 6 - len(finished)
    assert sorted(result["by_process"]["0"]) == sorted(set(STEMS) - set(finished))
    assert {name: (out / name).stat().st_ino for name in stamps} == {n: s[0] for n, s in stamps.items()}
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == {n: s[1] for n, s in stamps.items()}
    single, resumed = outputs(job["single"]), outputs(out)
    assert single.keys() == resumed.keys() and all(single[n] == resumed[n] for n in single)
    assert not (out / ".partial").exists()
