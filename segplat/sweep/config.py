"""The sweeper's structured config (`hydra/sweeper: segplat_optuna`); every field is documented here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class SegplatOptunaSweeperConf:
    _target_: str = "segplat.sweep.sweeper.OptunaSweeper"
    # the sampler is a config group, as in hydra-optuna-sweeper: hydra/sweeper/sampler=tpe|random|cmaes|nsgaii|grid|
    # gp|qmc (segplat/conf/hydra/sweeper/sampler/)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    # the sweeper builds the sampler itself (a joining worker reseeds it, a grid is filled from params)
    _recursive_: bool = False
    # the study's name in the storage; the sweep folder is usually named after it; null = the sweep folder's name
    study_name: str | None = None
    # an SQLAlchemy URL (postgresql://user@host/db, sqlite:////abs/path.db); null = <sweep dir>/study.db
    storage: str | None = None
    # the total trial budget of the study, shared by every worker and every resume
    n_trials: int = 20
    # at most this many trials by this process (null = until the budget is spent)
    worker_trials: int | None = None
    # auto = from callbacks.mode; maximize / minimize; or a list, one per objective (hydra-optuna-sweeper's
    # `direction: [maximize, minimize]`), whose keys hydra.sweeper.objectives names
    direction: Any = "auto"
    # multi-objective: [{key: best_score, direction: auto}, {key: num_parameters, direction: minimize}];
    # keys are fields of the trial's summary.json; null = [{key: best_score, direction: auto}]
    objectives: Any = None
    # {_target_: optuna.samplers.XSampler, seed: INT, <constructor keys>}: composed from hydra/sweeper/sampler
    sampler: Any = MISSING
    # {name: median|percentile|hyperband|successive_halving|threshold|wilcoxon|none, <pruner options>}
    pruner: Any = field(default_factory=lambda: {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 0})
    # key -> sweep expression or {when: {KEY: VALUE}, values: EXPRESSION}; see segplat/conf/sweep/fusion_patch_lr.yaml
    params: Any = field(default_factory=dict)
    # hydra-optuna-sweeper's hook: a dotted path to fn(config, trial) that suggests more parameters after params
    # (each becomes a `key=value` override of the trial; the space check before the first trial cannot see them)
    custom_search_space: str | None = None
    # trials enqueued first, once, when the study is created: a list of {key: value} maps of searched keys
    # (checked before the study exists; an interrupted baseline is enqueued again)
    baselines: Any = field(default_factory=list)
    # how a trial starts: null = [python]; e.g. [torchrun, --nproc-per-node, "2"]
    launcher_cmd: Any = None
    # the module each trial runs
    task_module: str = "segplat.train"
    # stop when failed / finished trials exceeds this (0 = stop at the first failure)
    max_failure_rate: float = 0.5
    # seconds before a trial is killed and recorded FAILED (null = no limit)
    trial_timeout: float | None = None
    # a worker's heartbeat (s); a RUNNING trial without one for grace_period (default 2x) is FAILED
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    # re-run a trial whose worker died this many times (RetryFailedTrialCallback); 0 = just FAIL it
    retry_failed: int = 0
    # extra environment variables for the trials (e.g. CUDA_VISIBLE_DEVICES)
    env: Any = field(default_factory=dict)
    # how many stderr lines of a failed trial go into its user_attrs
    stderr_lines: int = 30
    # trials at once from this sweeper (hydra-optuna-sweeper's name): local trials get their own devices (round-robin
    # over CUDA_VISIBLE_DEVICES or the GPUs torch counts) and CPUs // n_jobs threads; with hydra/launcher=slurm, jobs
    # in flight at once (segplat/sweep/slots.py, cluster.py)
    n_jobs: int = 1
    # let more local trials than devices share them (trial i gets device i mod D)
    share_devices: bool = False
