"""hydra-optuna-sweeper's example config (tests/sweep/peer_conf/config.yaml: the peer's example/conf/config.yaml with
segplat's sweeper and the train task's keys) runs end to end through `python -m segplat.train --multirun
--config-dir ... --config-name config`, with a tiny budget given on the command line as the peer's own tests give it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from omegaconf import OmegaConf

from segplat.sweep.config import SegplatOptunaSweeperConf
from tests.conftest import TINY

pytestmark = pytest.mark.slow
PEER_CONF = Path(__file__).parent / "peer_conf"


def peer_conf_dir(tmp_path: Path) -> Path:
    """The fixture as written; `n_jobs` (the peer's parallel workers, another part of segplat) is dropped only while
    segplat's sweeper config does not have it yet."""
    if any(f.name == "n_jobs" for f in dataclasses.fields(SegplatOptunaSweeperConf)):
        return PEER_CONF
    folder = tmp_path / "peer_conf"
    folder.mkdir()
    text = (PEER_CONF / "config.yaml").read_text()
    (folder / "config.yaml").write_text("".join(line for line in text.splitlines(True) if "n_jobs:" not in line))
    return folder


def test_the_peers_example_config_sweeps_the_train_task(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "segplat.train", "--multirun", "--config-dir", str(peer_conf_dir(tmp_path)),
           "--config-name", "config", f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=2",
           *TINY, "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "callbacks.early_stopping=null"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-4000:]

    study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for t in study.trials:  # the peer's range(0.001, 0.003, step=0.001): 0.001, 0.002 or 0.003, a float
        assert isinstance(t.params["optimizer.lr"], float) and round(t.params["optimizer.lr"], 6) in (0.001, 0.002,
                                                                                                      0.003)
        trained = yaml.safe_load((sweep_dir / f"trial_{t.number:04d}" / "config.yaml").read_text())
        assert trained["optimizer"]["lr"] == t.params["optimizer.lr"]
        assert trained["optimizer"]["weight_decay"] == t.params["optimizer.weight_decay"]
        # the trial composed the same primary config as the sweep (segplat's sweeper forwards the config flags)
        hydra_cfg = yaml.safe_load((sweep_dir / f"trial_{t.number:04d}" / ".hydra" / "hydra.yaml").read_text())
        assert hydra_cfg["hydra"]["job"]["config_name"] == "config"
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.name == "optuna" and results.best_value == study.best_value
    assert dict(results.best_params) == study.best_params
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "outputs").exists()
