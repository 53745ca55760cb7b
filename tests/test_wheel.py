"""A wheel built from the repository, installed into a fresh venv, runs the default job in an empty folder.

No checkout is on the path: the config tree (segplat/conf) and the sweeper plugin (hydra_plugins) must come from
the wheel. The dependencies are not installed again (no download, no minutes of torch): a `.pth` file points the
new venv at this environment's site-packages, whose entries are plain folders, so none of its own `.pth` files (the
editable install's finder of the repository) run in the new venv; the test checks that segplat is the wheel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONF_DIR, REPO

IGNORED = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", "logs", "outputs",
                                 "multirun", ".pytest_cache", ".ruff_cache", "wandb", "mlruns", "*.zarr", ".cache")


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def build_wheel(tmp: Path) -> Path:
    """`pip wheel` of a copy of the sources (the checkout is left untouched; no build isolation: no download)."""
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=IGNORED)
    sh([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", str(tmp / "dist")], src)
    (wheel,) = (tmp / "dist").glob("segplat-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = sh([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip()
    (Path(purelib) / "_segplat_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp)
    return venv


@pytest.mark.slow
def test_a_wheel_runs_the_default_job_from_an_empty_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(str(p.relative_to(CONF_DIR.parent.parent)) for p in CONF_DIR.rglob("*.yaml"))
    assert shipped and set(shipped) <= set(names), "the wheel lacks config files"
    assert "hydra_plugins/segplat_sweeper/segplat_optuna_sweeper.py" in names

    venv = fresh_venv(tmp_path, wheel)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(SEGPLAT_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    where = sh([str(venv / "bin" / "python"), "-c",
                "import segplat, hydra_plugins.segplat_sweeper as p; from hydra.core.plugins import Plugins; "
                "from hydra.plugins.sweeper import Sweeper; print(segplat.__file__); print(p.__file__); "
                "print([s.__name__ for s in Plugins.instance().discover(Sweeper)])"], empty, env).splitlines()
    assert all(Path(line).is_relative_to(venv) for line in where[:2]), where  # the wheel's, not the checkout's
    assert "SegplatOptunaSweeper" in where[2]

    out = sh([str(venv / "bin" / "segplat-train"), "debug=fast", "run_name=from_wheel"], empty, env)
    run_dir = Path(out.strip().splitlines()[-1].removeprefix("run_dir: "))
    assert run_dir == empty / "logs" / "train" / "runs" / "from_wheel"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "config.yaml").is_file()

    # the other tasks from the same wheel: prepare (the store exists: verified), predict, evaluate, a sweep
    bin_dir = venv / "bin"
    assert "verified" in sh([str(bin_dir / "segplat-prepare")], empty, env).lower()
    scene = tmp_path / "scene"
    sh([str(bin_dir / "python"), "-m", "segplat.data.fake", "scene", str(scene)], empty, env)
    out = sh([str(bin_dir / "segplat-predict"), f"ckpt={run_dir}",
              f"input={{rgb: {scene / 'scene_rgb.tif'}, nir: {scene / 'scene_nir.tif'}}}"], empty, env)
    predicted = Path(out.strip().splitlines()[-1].removeprefix("run_dir: "))
    assert list(predicted.rglob("*.tif")), out
    out = sh([str(bin_dir / "segplat-evaluate"), f"ckpt={run_dir}"], empty, env)
    evaluated = Path(out.strip().splitlines()[-1].removeprefix("run_dir: "))
    assert 0.0 <= json.loads((evaluated / "metrics.json").read_text())["miou"] <= 1.0, out
    out = sh([str(bin_dir / "segplat-train"), "--multirun", "sweep=fusion_patch_lr", "debug=fast",
              "hydra.sweeper.n_trials=1"], empty, env)
    sweep_dir = empty / "logs" / "train" / "sweeps" / "fusion_patch_lr_debug"  # debug=fast: a study of its own
    assert (sweep_dir / "study.db").is_file() and (sweep_dir / "optimization_results.yaml").is_file(), out
    assert sorted(p.name for p in sweep_dir.glob("trial_*")) == ["trial_0000"]
    assert sorted(p.name for p in empty.iterdir()) == ["logs"]
