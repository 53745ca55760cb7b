"""How the sweeper treats Hydra's launcher (segplat/sweep/cluster.py), without a scheduler: the basic launcher runs
local trials, submitit's launchers run each trial as a job (here submitit's local executor, the same code path as
SLURM's but for the state lookup), any other launcher is refused in one sentence, and a job whose sweeper stopped
renewing its lease stops its trial."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segplat.errors import ConfigError
from segplat.sweep.cluster import LEASE, launcher_backend, run_trial_job
from segplat.sweep.runner import run_trial

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}


def _config(launcher: dict, choice: str) -> OmegaConf:
    return OmegaConf.create({"hydra": {"launcher": launcher, "runtime": {"choices": {"hydra/launcher": choice}}}})


def test_basic_launcher_means_local_trials_and_others_are_refused() -> None:
    basic = _config({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, "basic")
    assert launcher_backend(basic, 120) is None
    joblib = _config({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                      "n_jobs": 4}, "joblib")
    with pytest.raises(ConfigError) as err:
        launcher_backend(joblib, 120)
    text = str(err.value)
    assert text.startswith("hydra/launcher=joblib cannot run the trials of a segplat sweep") and "\n" not in text
    assert "hydra.sweeper.n_jobs=K" in text and "hydra/launcher=slurm" in text and "launcher_cmd=[srun" in text


def _local_launcher(folder: Path) -> OmegaConf:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

    node = OmegaConf.structured(LocalQueueConf(submitit_folder=str(folder / "%j"), name="t", timeout_min=5))
    return _config(OmegaConf.to_container(node), "submitit_local")


@pytest.mark.slow
def test_a_trial_as_a_submitit_job(tmp_path: Path) -> None:
    backend = launcher_backend(_local_launcher(tmp_path / "jobs"), lease_seconds=120)
    assert backend is not None and backend.cluster == "local"
    facts: dict = {}
    res = run_trial(["ok"], tmp_path / "t", {**ENV, "SEGPLAT_TRIAL_NUMBER": "7"}, module="tests.sweep.fake_task",
                    start=backend.start, on_start=facts.update)
    assert res.returncode == 0 and res.summary is not None and res.summary["env"]["SEGPLAT_TRIAL_NUMBER"] == "7"
    assert facts["local_job_id"] == res.facts["local_job_id"] and res.facts["local_state"] == "FINISHED"
    assert not (tmp_path / "t" / LEASE).exists()
    bad = run_trial(["crash"], tmp_path / "c", ENV, module="tests.sweep.fake_task", start=backend.start)
    assert bad.returncode == 2 and bad.error_line == "dataset.root=/nowhere does not exist; set dataset.root."
    # a time limit cancels the job
    start = time.monotonic()
    slow = run_trial(["sleep"], tmp_path / "s", ENV, module="tests.sweep.fake_task", start=backend.start, timeout=3)
    assert slow.timed_out and slow.summary is None and time.monotonic() - start < 40


@pytest.mark.slow
def test_a_job_stops_its_trial_when_the_lease_lapses(tmp_path: Path) -> None:
    import sys

    run_dir = tmp_path / "t"
    run_dir.mkdir()
    (run_dir / LEASE).write_text("0\n")
    got: dict = {}
    worker = threading.Thread(target=lambda: got.update(code=run_trial_job(
        [sys.executable, "-m", "tests.sweep.fake_task", "sleep", f"hydra.run.dir={run_dir}"], str(run_dir), ENV, 3.0)))
    start = time.monotonic()
    worker.start()
    worker.join(timeout=60)
    assert got.get("code") == 3 and time.monotonic() - start < 30
    error = (run_dir / "stderr.log").read_text().strip().splitlines()[-1]
    assert error.startswith("error: the sweeper that submitted this trial stopped renewing") and "3 s" in error
    assert not (run_dir / "summary.json").exists()


def test_sharing_devices_is_refused_where_the_scheduler_gives_them(tmp_path: Path) -> None:
    from segplat.sweep.sweeper import OptunaSweeper

    sweeper = OptunaSweeper(n_jobs=2, share_devices=True)
    sweeper.config = _local_launcher(tmp_path / "jobs")
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.share_devices=true does nothing with "
                                          r"hydra/launcher=submitit_local \(the scheduler"):
        sweeper.check_launcher()
    sweeper.share_devices = False
    assert sweeper.check_launcher() == [{}, {}] and sweeper.backend is not None
