"""Training and sweeps on a real one-node SLURM (tests/cluster/slurm.py): the sbatch script on a CPU and on a GPU-gres
partition with a requeue in the middle, Hydra's submitit launcher with the CPU preset, a sweep whose trials are SLURM
jobs, and sweep workers as a job array sharing a PostgreSQL study. Every job trains the tiny synthetic setting of the
other CLI tests for a few epochs, so each takes seconds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.cluster.conftest import job_env
from tests.cluster.slurm import Slurm
from tests.conftest import REPO, TINY
from tests.sweep.test_postgres import postgres_url  # noqa: F401  (the module fixture)
from tests.sweep.test_sweeper import SWEEPS

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
optuna.logging.set_verbosity(optuna.logging.WARNING)
SBATCH = REPO / "launch" / "slurm.sbatch"
ARRAY = REPO / "launch" / "slurm_sweep_array.sbatch"
TRAIN = [*TINY, "trainer=cpu", "trainer.limit_val_batches=1"]


def _wait_for(path: Path, slurm: Slurm, job: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = slurm.job(job).get("JobState", "")
        if state in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT") or time.monotonic() > deadline:
            raise AssertionError(f"job {job} is {state} and {path} never appeared; {slurm.job(job)}")
        time.sleep(0.2)


def test_sbatch_script_trains_and_resumes_after_a_requeue_on_cpu_and_gpu_partitions(slurm: Slurm,
                                                                                    tmp_path: Path) -> None:
    """No GPU and no CPU count in the script: the CPU partition runs 1 process, the GPU partition (a gres backed by
    /dev/null) 1 process per GPU; each job is requeued once it has a checkpoint and resumes it."""
    epochs = 6
    jobs = {}
    for name, resources in (("cpu", ["--partition=cpu"]), ("gpu", ["--partition=gpu", "--gpus-per-node=1"])):
        env = job_env(slurm, tmp_path / name / "logs")
        jobs[name] = slurm.sbatch(*resources, f"--chdir={tmp_path}", f"--output={tmp_path / name}-%j.out",
                                  str(SBATCH), *TRAIN, f"trainer.max_epochs={epochs}", env=env)
    for name, job in jobs.items():
        run_dir = tmp_path / name / "logs" / "train" / "runs" / f"slurm-{job}"
        _wait_for(run_dir / "checkpoints" / "last.ckpt", slurm, job)
        slurm.requeue(job)
    for name, job in jobs.items():
        info = slurm.wait(job, timeout=400)
        run_dir = tmp_path / name / "logs" / "train" / "runs" / f"slurm-{job}"
        out = (tmp_path / f"{name}-{job}.out").read_text()
        assert info["Restarts"] == "1", info
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["epochs_completed"] == epochs, out[-3000:]
        resumed = re.findall(r"resumed from \S+ at epoch (\d+)", out)
        assert resumed and 1 <= int(resumed[-1]) <= epochs, out[-3000:]
        assert "--nproc-per-node 0" not in out and "ZeroDivisionError" not in out
        assert "segplat: 1 node(s) x 1 process(es)" in out, out[-3000:]
    gpu_out = (tmp_path / f"gpu-{jobs['gpu']}.out").read_text()
    assert slurm.job(jobs["gpu"]).get("TresPerNode", "") == "gres:gpu:1", gpu_out[-2000:]


def test_submitit_launcher_with_the_cpu_preset(slurm: Slurm, tmp_path: Path) -> None:
    """`-m hydra/launcher=slurm_cpu`: Hydra's own submitit launcher submits the run; the preset fits a small node."""
    env = job_env(slurm, tmp_path / "logs")
    sweep_dir = tmp_path / "multirun"
    res = subprocess.run([sys.executable, "-m", "segplat.train", "-m", "hydra/launcher=slurm_cpu",
                          "hydra.launcher.partition=cpu", f"hydra.sweep.dir={sweep_dir}", *TRAIN,
                          "trainer.max_epochs=1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["status"] == "completed"
    submitted = sorted((sweep_dir / ".submitit").glob("*/*_submission.sh"))
    assert submitted, "the job went through submitit"
    script = submitted[0].read_text()
    assert "#SBATCH --cpus-per-task=2" in script and "--gpus" not in script and "--mem" not in script
    job = submitted[0].parent.name
    slurm.wait(job, timeout=60)  # the result is written just before the job ends


SLURM_SWEEP = SWEEPS["prune"].replace("study_name: prune", "study_name: onslurm") \
    .replace("  sweeper:\n", "  sweeper:\n    heartbeat_interval: 5\n")


def test_a_sweep_whose_trials_are_slurm_jobs(slurm: Slurm, tmp_path: Path) -> None:
    """`--multirun sweep=... hydra/launcher=slurm_cpu`: every trial is its own SLURM job (never a local process); the
    good baseline completes, the vanishing learning rate is pruned at its first report, and the budget is exact."""
    root = tmp_path / "root"
    (root / "sweep").mkdir(parents=True)
    (root / "sweep" / "onslurm.yaml").write_text(SLURM_SWEEP)
    sweep_dir = tmp_path / "sweep"
    env = job_env(slurm, tmp_path / "logs")
    cmd = [sys.executable, "-m", "segplat.train", "--multirun", "sweep=onslurm", f"hydra.searchpath=[file://{root}]",
           f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=slurm_cpu", "hydra.launcher.partition=cpu",
           "hydra.launcher.cpus_per_task=1", *TRAIN]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    study = optuna.load_study(study_name="onslurm", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    good, bad = study.get_trials(deepcopy=False)  # n_trials=2: the budget is exact
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED
    assert sorted(bad.intermediate_values) == [1]
    for trial in (good, bad):
        job = trial.user_attrs["slurm_job_id"]
        info = slurm.job(job)
        assert info.get("JobState") == "COMPLETED" and info.get("Partition") == "cpu", info
        assert trial.user_attrs["slurm_state"] == "COMPLETED"
        assert (Path(trial.user_attrs["run_dir"]) / "stdout.log").is_file()
    log = res.stdout + res.stderr
    assert "as slurm jobs of hydra/launcher=slurm_cpu" in log, log[-3000:]


def test_a_job_the_scheduler_refuses_stops_the_sweep_in_one_sentence(slurm: Slurm, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sweep").mkdir(parents=True)
    (root / "sweep" / "onslurm.yaml").write_text(SLURM_SWEEP)
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "segplat.train", "--multirun", "sweep=onslurm", f"hydra.searchpath=[file://{root}]",
           f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=slurm_cpu", "hydra.launcher.partition=nosuch", *TRAIN]
    res = subprocess.run(cmd, env=job_env(slurm, tmp_path / "logs"), cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert "the slurm scheduler refused the trial's job for hydra/launcher=slurm_cpu" in errors[0]
    assert "invalid partition" in errors[0].lower() and "Traceback" not in res.stderr
    study = optuna.load_study(study_name="onslurm", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    first = study.get_trials(deepcopy=False)[0]
    assert first.state == TrialState.FAIL and first.user_attrs["segplat_not_run"], "no budget spent"


ARRAY_SWEEP = SWEEPS["tiny"].replace("study_name: tiny", "study_name: array").replace("heartbeat_interval: 5",
                                                                                       "heartbeat_interval: 10")


def test_sweep_workers_as_a_job_array_share_a_postgres_study(slurm: Slurm, tmp_path: Path,
                                                             postgres_url: str) -> None:  # noqa: F811
    """launch/slurm_sweep_array.sbatch with 2 array tasks: two sweepers, one study, one budget, each trial a job step
    (hydra.sweeper.launcher_cmd=[srun,...]); the database URL reaches them through the environment only."""
    root = tmp_path / "root"
    (root / "sweep").mkdir(parents=True)
    (root / "sweep" / "array.yaml").write_text(ARRAY_SWEEP)
    sweep_dir = tmp_path / "sweep"
    env = job_env(slurm, tmp_path / "logs", SEGPLAT_STUDY_STORAGE=postgres_url, SWEEP_DIR=str(sweep_dir))
    job = slurm.sbatch("--array=0-1", "--partition=cpu", f"--chdir={tmp_path}", f"--output={tmp_path}/w-%A_%a.out",
                       str(ARRAY), "sweep=array", f"hydra.searchpath=[file://{root}]", "hydra.sweeper.n_trials=4",
                       "hydra/sweeper/sampler=random", "hydra.sweeper.launcher_cmd=[srun,--ntasks,1,python]",
                       *TRAIN, env=env)
    for task in (0, 1):
        slurm.wait(f"{job}_{task}", timeout=500)
    study = optuna.load_study(study_name="array", storage=postgres_url)
    trials = [t for t in study.trials if t.state != TrialState.WAITING]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "both array tasks ran trials"
    for t in trials:  # each trial was a job step of its worker's allocation (launch/README.md's spelling)
        command = (Path(t.user_attrs["run_dir"]) / "command.txt").read_text()
        assert command.startswith("srun --ntasks 1 python -m segplat.train "), command
    outputs = [(tmp_path / f"w-{job}_{task}.out").read_text() for task in (0, 1)]
    for task, out in enumerate(outputs):
        assert f"sweep worker {task} of job {job}" in out
    password = postgres_url.split(":")[2].split("@")[0]
    assert password not in slurm.run("scontrol", "show", "job", str(job), check=False).stdout
    leaks = [str(f) for f in sweep_dir.rglob("*") if f.is_file() and password.encode() in f.read_bytes()]
    assert not leaks, leaks
