"""Trials as cluster jobs: the sweeper honours Hydra's submitit launchers.

`--multirun sweep=NAME hydra/launcher=slurm` (segplat's presets in conf/hydra/launcher/, or hydra-submitit-launcher's
own `submitit_slurm` / `submitit_local`) submits each trial as its own job with the launcher's resources
(partition, nodes, gpus_per_node, tasks_per_node, cpus_per_task, mem_gb, timeout_min, setup, ...), through the same
library the launcher uses (submitit), so a preset means the same for a sweep as for `-m` without one. The sweeper
stays on the submit host and does for a job what it does for a local trial (runner.py): it keeps the trial's
heartbeat while the job waits and runs, applies `hydra.sweeper.trial_timeout` to its running time, cancels it when
the sweeper is stopped, and reads the result from the trial's run folder (which must be on storage the nodes
share, as the sweep folder must be for Hydra's launcher).

In the job, `run_trial_job` starts the trial's command as a child process (a fresh interpreter, as for a local
trial; with several tasks, each task's child is one torch.distributed rank, from SLURM_PROCID) with its output in
the run folder, and stops it when the sweeper that submitted it stops renewing the run folder's lease file: a
sweeper killed with SIGKILL cannot cancel its jobs, and a trial must not outlive it (a local trial dies with its
sweeper through PR_SET_PDEATHSIG). The database URL reaches the job through the environment sbatch exports, never
through submitit's pickle files.

Any other Hydra launcher (joblib, ray, rq) cannot run a trial that prunes itself and reports to a shared study, and
is refused in one sentence that gives the spellings that work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segplat.errors import ConfigError
from segplat.messages import first_line

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SUBMITIT_BASE = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher"
LEASE = "sweeper.lease"  # renewed by the sweeper while it watches the job
RUNNING = ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED")
WAITING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING",
           "READY", "UNKNOWN")
POLL_SECONDS = 2.0
LOST_AFTER = 120.0  # seconds a job may be unknown to the scheduler (and have no result) before it counts as lost


def launcher_choice(config: DictConfig) -> str:
    return str(OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/launcher", "basic"))


def launcher_backend(config: DictConfig, lease_seconds: float) -> SubmititBackend | None:
    """The cluster backend for the selected `hydra/launcher`; None for Hydra's basic launcher (local trials)."""
    node = OmegaConf.select(config, "hydra.launcher", default=None)
    target = str(node.get("_target_", BASIC_LAUNCHER)) if node is not None else BASIC_LAUNCHER
    if target == BASIC_LAUNCHER:
        return None
    choice = launcher_choice(config)
    executor = None
    try:
        from hydra.utils import get_class

        cls = get_class(target)
        base = get_class(SUBMITIT_BASE)
        executor = getattr(cls, "_EXECUTOR", None) if issubclass(cls, base) else None
    except Exception:
        executor = None
    if executor not in ("slurm", "local"):
        raise ConfigError(
            f"hydra/launcher={choice} cannot run the trials of a segplat sweep (each trial is its own process that "
            "prunes itself and reports to the study); run trials as SLURM jobs with hydra/launcher=slurm, "
            "slurm_cpu or submitit_slurm, several at once on this node with hydra.sweeper.n_jobs=K, or through a "
            "command with 'hydra.sweeper.launcher_cmd=[srun,--ntasks,1,python]' (see launch/README.md).")
    params = OmegaConf.to_container(node, resolve=True)
    assert isinstance(params, dict)
    params.pop("_target_", None)
    return SubmititBackend(str(executor), {str(k): v for k, v in params.items()}, choice, lease_seconds)


class SubmititBackend:
    """Submits trial commands as submitit jobs with the launcher's parameters (as hydra-submitit-launcher does)."""

    def __init__(self, cluster: str, params: dict[str, Any], choice: str, lease_seconds: float) -> None:
        try:
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        except ImportError:
            raise ConfigError(f"hydra/launcher={choice} needs hydra-submitit-launcher; pip install "
                              "hydra-submitit-launcher.") from None
        self.cluster, self.choice, self.lease_seconds = cluster, choice, float(lease_seconds)
        params = dict(params)
        self.folder = str(params.pop("submitit_folder"))
        init: dict[str, Any] = {"folder": self.folder}
        if "max_num_timeout" in params:
            init[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        self.name = str(params.pop("name", "segplat") or "segplat")
        try:
            self.executor = submitit.AutoExecutor(cluster=cluster, **init)
            self.executor.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()})
        except (ValueError, TypeError, RuntimeError) as err:
            raise ConfigError(f"hydra/launcher={choice}: submitit refuses hydra.launcher ({first_line(err)}); fix "
                              "the key it names.") from None
        self._lock = threading.Lock()

    def start(self, cmd: Sequence[str], run_dir: Path, env: dict[str, str], name: str = "") -> ClusterTrial:
        _renew(run_dir / LEASE)
        import submitit

        with self._lock:  # the job's name is an executor parameter: set and submit together
            self.executor.update_parameters(name=name or self.name)
            try:
                job = self.executor.submit(run_trial_job, list(cmd), str(run_dir), dict(env), self.lease_seconds)
            except submitit.core.utils.FailedJobError as err:
                raise ConfigError(f"the {self.cluster} scheduler refused the trial's job for hydra/launcher="
                                  f"{self.choice} ({_last_line(err)}); fix hydra.launcher (partition, resources).") \
                    from None
        return ClusterTrial(job, self.cluster, run_dir)


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _renew(lease: Path) -> None:
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(f"{time.time():.3f}\n")


class ClusterTrial:
    """A submitted trial job, watched by state (squeue/scontrol for SLURM: no accounting database needed)."""

    def __init__(self, job: Any, cluster: str, run_dir: Path) -> None:
        self.job, self.cluster, self.run_dir = job, cluster, run_dir
        self.facts: dict[str, Any] = {f"{cluster}_job_id": str(job.job_id)}
        self.returncode: int | None = None
        self.ended = ""
        self.state = "PENDING"
        self._started: float | None = None
        self._next_poll = 0.0
        self._unknown_since: float | None = None

    def running_since(self) -> float | None:
        return self._started

    def wait(self, seconds: float) -> bool:
        time.sleep(seconds)
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + POLL_SECONDS
        _renew(self.run_dir / LEASE)
        self.state = job_state(self.job, self.cluster)
        if self.state in RUNNING and self._started is None:
            self._started = now
        has_result = self.job.paths.result_pickle.exists()
        if self.state == "UNKNOWN" and not has_result:
            self._unknown_since = self._unknown_since or now
            if now - self._unknown_since > LOST_AFTER:
                self.ended = f"{self.cluster} job {self.job.job_id} was lost (the scheduler no longer knows it)"
                return True
            return False
        self._unknown_since = None
        if self.state in RUNNING or (self.state in WAITING and not has_result):
            return False
        self.returncode = self._result()
        if self.returncode is None:
            self.ended = f"{self.cluster} job {self.job.job_id} ended {self.state}"
        self.facts[f"{self.cluster}_state"] = self.state
        return True

    def _result(self) -> int | None:
        if not self.job.paths.result_pickle.exists():
            return None
        try:
            value = self.job.results()[0]
        except Exception as err:  # the job function raised (e.g. the trial command could not start)
            self.ended = f"{self.cluster} job {self.job.job_id} failed: {_last_line(err)}"
            return None
        return int(value) if isinstance(value, int) else None

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.job.cancel(check=False)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            (self.run_dir / LEASE).unlink()

    def scheduler_log(self) -> str:
        with contextlib.suppress(Exception):
            return str(self.job.stderr() or "")
        return ""


def job_state(job: Any, cluster: str) -> str:
    """The job's scheduler state. SLURM: `scontrol show job` (what the controller holds, no accounting needed), then
    `sacct` for a job the controller has forgotten; local submitit jobs: submitit's own watcher."""
    if cluster != "slurm":
        return str(job.state).split()[0].upper()
    base = str(job.job_id)
    out = _quiet(["scontrol", "-o", "show", "job", base])
    for item in out.split():
        if item.startswith("JobState="):
            return item.split("=", 1)[1]
    out = _quiet(["sacct", "-X", "-n", "-P", "-o", "State", "-j", base])
    words = out.split()
    return words[0].upper() if words else "UNKNOWN"


def _quiet(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout if res.returncode == 0 else ""


# -- in the job ------------------------------------------------------------------------------------------------------
def run_trial_job(cmd: list[str], run_dir: str, env: dict[str, str], lease_seconds: float) -> int:
    """Run the trial's command in the job (each task runs this; task 0 writes stdout.log / stderr.log, task N
    stdout.rankN.log / stderr.rankN.log) and stop it when the sweeper's lease lapses. Returns its exit code."""
    from segplat.sweep.runner import _die_with_parent, _stop

    folder = Path(run_dir)
    rank = _task_rank()
    suffix = "" if rank == 0 else f".rank{rank}"
    lease = folder / LEASE
    with open(folder / f"stdout{suffix}.log", "wb") as out, open(folder / f"stderr{suffix}.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **env}, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        forward = _forward_term(proc)
        try:
            seen, changed = _mtime(lease), time.monotonic()
            while True:
                try:
                    return proc.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
                now, current = time.monotonic(), _mtime(lease)
                if current != seen:
                    seen, changed = current, now
                elif now - changed > lease_seconds:
                    _stop(proc)
                    err.write(f"error: the sweeper that submitted this trial stopped renewing {lease} for "
                              f"{lease_seconds:g} s; the trial was stopped with it.\n".encode())
                    return 3
        finally:
            if forward is not None:
                signal.signal(signal.SIGTERM, forward)
            if proc.poll() is None:
                _stop(proc)


def _task_rank() -> int:
    try:
        import submitit

        return int(submitit.JobEnvironment().global_rank)
    except Exception:
        return int(os.environ.get("SLURM_PROCID", "0"))


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _forward_term(proc: subprocess.Popen) -> Any:
    """submitit ignores SIGTERM in the job; pass it on to the trial (scancel, a requeue), which stops cleanly."""

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)

    try:
        return signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread (a test calling the function directly): nothing to forward
        return None
