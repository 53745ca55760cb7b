"""The Optuna sweeper: ask a trial, run it as its own process, tell the result; many workers, one study.

Registered with Hydra as `hydra/sweeper: segplat_optuna` (hydra_plugins/segplat_sweeper), selected by
the sweep files (`python -m segplat.train --multirun sweep=fusion_patch_lr`). Unlike
hydra-optuna-sweeper it does not hand batches to Hydra's launcher: each trial is a subprocess
(see runner.py for why), so the trial can prune itself (segplat/sweep/pruning.py), one slow trial
never holds a batch, and the study (not this process) holds the state: running the same command
again, or on another machine against the same storage, continues the same study and budget.

Before anything is written the whole search space is checked (validate.py), so a typo or a refused
model x fusion combination costs no trial. Every trial that is asked ends in a state at once: run
and told, or FAILed with its reason (outside the budget, a baseline enqueued again) when the sweeper
could not run it or was stopped while it ran.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from segplat.engine.loggers import STUDY_ENV, TRIAL_ENV
from segplat.errors import ConfigError, SegplatError
from segplat.messages import first_line, not_known, show
from segplat.schema import PositiveInt, check_value
from segplat.sweep import space as sp
from segplat.sweep.cluster import SubmititBackend, launcher_backend
from segplat.sweep.heartbeat import this_worker
from segplat.sweep.outputs import write_outputs
from segplat.sweep.pruning import PRUNER_ENV, STORAGE_ENV
from segplat.sweep.runner import LocalTrial, run_trial
from segplat.sweep.slots import slot_envs
from segplat.sweep.study import (
    INTERRUPTED_ATTR,
    NOT_RUN_ATTR,
    SAMPLERS,
    ask_within_budget,
    budget_used,
    build_pruner,
    build_sampler,
    counts,
    failure_rate,
    heartbeat_enabled,
    is_grid,
    is_storage_error,
    make_storage,
    redact,
    requeue_baseline,
    sampler_target,
    storage_error,
    trial_id,
)
from segplat.sweep.tracking import SweepTracking
from segplat.sweep.validate import SpaceChecker
from segplat.utils.plain import to_plain

log = logging.getLogger("segplat.sweep")
OK_STATUSES = ("completed", "stopped_early", "stopped")
DIRECTIONS = ("auto", "maximize", "minimize")
# debug=fast: a sweep runs this many trials, in a study of its own (<study>_debug), so the real study is untouched
DEBUG_TRIALS = 3


class SweepInterrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception, so the running trial is stopped and recorded."""


@dataclass
class StartedTrial:
    """A trial asked, drawn and recorded, about to run."""

    trial: optuna.trial.Trial
    tid: int
    run_dir: Path
    overrides: list[str]
    searched: dict[str, Any]
    env: dict[str, str]
    heartbeat: Any




class OptunaSweeper:
    """The implementation behind the Hydra plugin class (which only forwards to it)."""

    def __init__(self, study_name: str | None = None, storage: str | None = None, n_trials: int = 20,
                 worker_trials: int | None = None, direction: Any = "auto", objectives: Any = None,
                 sampler: Any = None, pruner: Any = None, params: Any = None, baselines: Any = None,
                 launcher_cmd: Any = None, task_module: str = "segplat.train", max_failure_rate: float = 0.5,
                 trial_timeout: float | None = None, heartbeat_interval: int | None = 60,
                 grace_period: int | None = None, retry_failed: int = 0, env: Any = None,
                 stderr_lines: int = 30, n_jobs: PositiveInt = 1, share_devices: bool = False,
                 custom_search_space: str | None = None) -> None:
        self.study_name = str(study_name) if study_name is not None else None  # None: the sweep folder's name
        self.storage_url = storage
        if not isinstance(n_trials, int) or n_trials <= 0:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials} must be a positive integer.")
        if worker_trials is not None and (not isinstance(worker_trials, int) or worker_trials <= 0):
            raise ConfigError(f"hydra.sweeper.worker_trials={worker_trials} must be a positive integer or null.")
        if not 0.0 <= float(max_failure_rate) <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={max_failure_rate} must lie in [0, 1].")
        self.n_trials = n_trials
        self.worker_trials = worker_trials
        self.direction = to_plain(direction)
        self.objectives_spec = to_plain(objectives)
        self.sampler_spec = dict(to_plain(sampler) or {"_target_": SAMPLERS["tpe"]})
        self.custom_search_space = custom_search_space
        self.pruner_spec = dict(to_plain(pruner) or {"name": "none"})
        self.params_spec = dict(params or {})
        self.baselines = list(to_plain(baselines) or [])
        self.launcher_cmd = [str(x) for x in (to_plain(launcher_cmd) or [])] or None
        self.task_module = task_module
        self.max_failure_rate = float(max_failure_rate)
        self.trial_timeout = trial_timeout
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.retry_failed = int(retry_failed or 0)
        self.env = {str(k): str(v) for k, v in (to_plain(env) or {}).items()}
        self.stderr_lines = int(stderr_lines)
        # several trials at once (slots.py) and trials as cluster jobs (cluster.py)
        check_value("hydra.sweeper.n_jobs", PositiveInt, n_jobs)
        check_value("hydra.sweeper.share_devices", bool, share_devices)
        self.n_jobs, self.share_devices = int(n_jobs), bool(share_devices)
        self.backend: SubmititBackend | None = None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.storage: optuna.storages.BaseStorage | None = None
        self.url: str | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config

    # -- pieces -------------------------------------------------------------------------------
    def objectives(self) -> list[tuple[str, str]]:
        """(summary.json key, maximize|minimize) per objective. `direction` may be a list, one per objective (as
        hydra-optuna-sweeper writes it); `auto` follows callbacks.mode, and a direction for best_score that
        contradicts callbacks.mode is refused (it would search for the worst runs)."""
        mode = OmegaConf.select(self.config, "callbacks.mode", default="max") if self.config else "max"
        monitor = OmegaConf.select(self.config, "callbacks.monitor", default="the monitor") if self.config else ""
        monitor_dir = "maximize" if mode == "max" else "minimize"
        given = [str(getattr(d, "name", d)).lower() for d in
                 (self.direction if isinstance(self.direction, list | tuple) else [self.direction])]
        for i, d in enumerate(given):
            if d not in DIRECTIONS:
                key = "hydra.sweeper.direction" + (f"[{i}]" if isinstance(self.direction, list | tuple) else "")
                raise ConfigError(not_known(key, d, DIRECTIONS))
        spec = self.objectives_spec
        if spec is None:
            if len(given) > 1:
                raise ConfigError(f"hydra.sweeper.direction={show(given)} has {len(given)} objectives, but a trial "
                                  "reports its summary.json: name the key of each with hydra.sweeper.objectives=[{key: "
                                  "best_score}, {key: num_parameters}] (the directions then come from this list).")
            spec = [{"key": "best_score", "direction": given[0] if given else "auto"}]
        elif len(given) > 1 or given != ["auto"]:
            if len(given) != len(spec):
                raise ConfigError(f"hydra.sweeper.direction={show(given)} gives {len(given)} direction(s) for "
                                  f"{len(spec)} hydra.sweeper.objectives; give one per objective, or set them in "
                                  "hydra.sweeper.objectives and leave direction at auto.")
            spec = [{**({"key": item} if isinstance(item, str) else item), "from_direction": d}
                    for item, d in zip(spec, given, strict=True)]
        out = []
        for i, item in enumerate(spec):
            if isinstance(item, str):
                item = {"key": item, "direction": "auto"}
            key, direction = str(item.get("key", "best_score")), str(item.get("direction", "auto")).lower()
            listed = item.get("from_direction")
            if listed is not None and listed != "auto":
                if direction not in ("auto", listed):
                    raise ConfigError(f"hydra.sweeper.objectives[{i}].direction={direction} contradicts "
                                      f"hydra.sweeper.direction[{i}]={listed}; set it in one place.")
                direction = listed
            if direction == "auto":
                if key != "best_score":
                    raise ConfigError(f"hydra.sweeper.objectives[{i}].direction must be maximize or minimize for "
                                      f"{key} (auto only applies to best_score, from callbacks.mode).")
                direction = monitor_dir
            if direction not in ("maximize", "minimize"):
                raise ConfigError(not_known(f"hydra.sweeper.objectives[{i}].direction", direction, DIRECTIONS))
            if key == "best_score" and direction != monitor_dir:
                raise ConfigError(f"the sweep would {direction} best_score, the best {monitor} of each trial, "
                                  f"which callbacks.mode={mode} counts as better when "
                                  f"{'higher' if mode == 'max' else 'lower'}; use hydra.sweeper.direction="
                                  f"{monitor_dir} (or auto), or change callbacks.monitor/mode.")
            out.append((key, direction))
        return out

    def split_arguments(self, arguments: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """Command-line overrides: fixed ones go to every trial, sweep expressions join the space, and a
        plain `key=value` for a key of the space fixes that key (rather than being overridden by a draw)."""
        fixed, swept = [], {}
        parser = OverridesParser.create()
        for arg in arguments:
            override = parser.parse_overrides([arg])[0]
            if override.is_sweep_override():
                if override.is_delete() or override.is_add():
                    raise ConfigError(f"the sweep override {arg!r} cannot add or delete a key; write it as "
                                      "key=choice(...) on an existing key.")
                swept[override.key_or_group] = arg.split("=", 1)[1]
            elif arg.split("=", 1)[0] in self.params_spec and "=" in arg:
                swept[arg.split("=", 1)[0]] = arg.split("=", 1)[1]
                log.info("%s is fixed to %s by the command line for every trial", *arg.split("=", 1))
            else:
                fixed.append(arg)
        # the trials must find the same configs: forward search-path overrides (not in the task overrides)
        hydra_overrides = OmegaConf.select(self.config, "hydra.overrides.hydra", default=None) or []
        fixed += [str(a) for a in hydra_overrides if str(a).split("=", 1)[0].lstrip("+") == "hydra.searchpath"]
        return fixed, swept

    def config_groups(self, keys: Sequence[str]) -> set[str]:
        loader = getattr(self.hydra_context, "config_loader", None)
        groups = set()
        for key in keys:
            try:
                if loader is not None and "." not in key and loader.get_group_options(key):
                    groups.add(key)
            except Exception:
                continue
        return groups

    def sweep_dir(self) -> Path:
        assert self.config is not None
        return Path(str(self.config.hydra.sweep.dir)).resolve()

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The task's config as a trial with these overrides composes it (Hydra's compose API)."""
        from hydra import compose

        assert self.config is not None
        return compose(config_name=str(self.config.hydra.job.config_name), overrides=list(overrides),
                       return_hydra_config=True)

    def group_options(self, group: str) -> list[str]:
        loader = getattr(self.hydra_context, "config_loader", None)
        try:
            return sorted(loader.get_group_options(group)) if loader is not None else []
        except Exception:
            return []

    def task_args(self) -> list[str]:
        """The task's own config flags, so that a trial composes what this command composed: `--config-name`, and
        `--config-dir` when the command gave one (a peer-style primary config beside the user's project)."""
        if self.config is None:
            return []
        args = []
        for source in OmegaConf.select(self.config, "hydra.runtime.config_sources", default=None) or []:
            if source.get("provider") == "command-line" and source.get("schema") == "file":
                args += ["--config-dir", str(source.get("path"))]
        name = OmegaConf.select(self.config, "hydra.job.config_name", default=None)
        return [*args, "--config-name", str(name)] if name else args

    def search_space_extender(self) -> Any:
        """hydra-optuna-sweeper's `custom_search_space`: fn(config, trial), imported before anything runs."""
        if not self.custom_search_space:
            return None
        from hydra.utils import get_method

        try:
            fn = get_method(self.custom_search_space)
        except Exception as err:
            raise ConfigError(f"hydra.sweeper.custom_search_space={self.custom_search_space} cannot be imported "
                              f"({first_line(err.__cause__ or err)}); give the dotted path of a function "
                              "fn(config, trial) in an importable module.") from None
        log.info("hydra.sweeper.custom_search_space=%s adds parameters after each draw; the space check before the "
                 "first trial cannot see them", self.custom_search_space)
        return fn

    def debug_study(self) -> bool:
        """debug=fast: a few trials in a study of their own (`<study>_debug`, and its own folder when the sweep
        folder is named after the study), so that short debug trials never join the real study's results."""
        if OmegaConf.select(self.config, "hydra.runtime.choices.debug", default=None) != "fast":
            return False
        from omegaconf import open_dict, read_write

        name = f"{self.study_name or self.sweep_dir().name}_debug"
        with read_write(self.config), open_dict(self.config):
            OmegaConf.update(self.config, "hydra.sweeper.study_name", name)
        self.study_name = name
        if self.worker_trials is None or self.worker_trials > DEBUG_TRIALS:
            self.worker_trials = DEBUG_TRIALS
        return True

    def check_launcher(self) -> list[dict[str, str]]:
        """How trials start: the command, Hydra's launcher (cluster jobs) and the slots; their env per slot."""
        if self.launcher_cmd and shutil.which(self.launcher_cmd[0]) is None:
            raise ConfigError(f"hydra.sweeper.launcher_cmd starts with {self.launcher_cmd[0]}, which is not on the "
                              "PATH; install it or fix hydra.sweeper.launcher_cmd.")
        grace = self.grace_period or 2 * (self.heartbeat_interval or 60)
        self.backend = launcher_backend(self.config, lease_seconds=max(120.0, 2.0 * grace))
        if self.backend is not None:  # the scheduler places and pins each job
            if self.share_devices:
                raise ConfigError(f"hydra.sweeper.share_devices=true does nothing with hydra/launcher="
                                  f"{self.backend.choice} (the scheduler gives each trial's job its own devices); "
                                  "drop it, or ask for fewer GPUs per job in hydra.launcher.")
            return [{} for _ in range(self.n_jobs)]
        return slot_envs(self.n_jobs, self.env, self.share_devices)

    def open_study(self, url: str, directions: list[str], pruner: optuna.pruners.BasePruner,
                   baselines: list[dict[str, Any]]) -> tuple[optuna.Study, bool]:
        """Create the study (this worker then enqueues the baselines) or join the existing one."""
        self.storage = make_storage(url, self.heartbeat_interval, self.grace_period, self.retry_failed)
        try:
            study = optuna.create_study(study_name=self.study_name, storage=self.storage, directions=directions,
                                        pruner=pruner, load_if_exists=False)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=pruner)
            created = False
            have = [d.name.lower() for d in study.directions]
            if have != directions:
                raise ConfigError(f"study {self.study_name!r} in {redact(url)} optimises {have}, not {directions}; "
                                  "use another hydra.sweeper.study_name or the original objectives.") from None
        if created:
            study.set_user_attr("segplat_objectives", [k for k, _ in self.objectives()])
            study.set_user_attr("segplat_params", {str(k): str(to_plain(v)) for k, v in self.params_spec.items()})
            for i, fixed in enumerate(baselines):
                study.enqueue_trial(fixed, user_attrs={"baseline": i}, skip_if_exists=True)
        return study, created

    def trial_overrides(self, fixed: list[str], chosen: Mapping[str, Any], params: list[sp.Param],
                        trial_ref: tuple[int, int] | None) -> list[str]:
        """The trial's command-line overrides; `trial_ref` = (storage id, number) adds the pruning callback."""
        by_key = {p.key: p for p in params}
        overrides = list(fixed)
        for key, value in chosen.items():
            overrides.append(f"{key}={by_key[key].override_text(value)}")
        if trial_ref is not None:
            target = "+callbacks.optuna_pruning"
            overrides += [f"{target}._target_=segplat.sweep.pruning.OptunaPruningCallback",
                          f"{target}.study_name={sp.format_value(self.study_name)}",
                          f"{target}.trial_id={trial_ref[0]}", f"{target}.trial_number={trial_ref[1]}"]
        has_group = any(a.split("=", 1)[0].lstrip("+~") == "logger.wandb.group" for a in fixed)
        if not has_group and OmegaConf.select(self.config, "logger.wandb", default=None) is not None:
            overrides.append(f"logger.wandb.group={sp.format_value(self.study_name)}")
        return overrides

    # -- the loop ----------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> list[dict[str, Any]]:
        try:
            return self._sweep(arguments)
        except SegplatError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: the study keeps every finished trial; run the same command again to continue.",
                  file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as err:
            if not is_storage_error(err) or self.url is None:
                raise
            print(f"error: {storage_error(self.url, err)}", file=sys.stderr, flush=True)  # the database went away
            sys.exit(2)

    def check_space_matches(self, study: optuna.Study, params: Sequence[sp.Param], url: str) -> None:
        """A resumed study keeps the choices its trials drew from: Optuna refuses another set of choices for a key
        only when that key is next suggested, after a trial has started and is marked FAIL."""
        now = {p.key: p.distribution for p in params if p.distribution is not None}
        for trial in study.get_trials(deepcopy=False):
            for key, before in trial.distributions.items():
                if key not in now:
                    continue
                try:
                    optuna.distributions.check_distribution_compatibility(before, now[key])
                except ValueError:
                    raise ConfigError(
                        f"study {self.study_name!r} in {redact(url)} searched {key} over {_shown(before)}, not "
                        f"{_shown(now[key])}; keep the study's space, or start another study with "
                        "hydra.sweeper.study_name=NEW (or a new hydra.sweep.dir).") from None

    def _sweep(self, arguments: list[str]) -> list[dict[str, Any]]:
        assert self.config is not None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        fixed, cli_params = self.split_arguments(arguments)
        params = sp.parse_params({**self.params_spec, **cli_params})
        searched = [p for p in params if p.distribution is not None]
        if not searched and not self.custom_search_space:
            raise ConfigError("hydra.sweeper.params searches nothing; add a choice/range/interval, e.g. "
                              "sweep=fusion_patch_lr.")
        objectives = self.objectives()
        directions = [d for _, d in objectives]
        grid = sp.grid_space(searched) if is_grid(self.sampler_spec) else None
        seed = self.sampler_spec.get("seed")
        sampler = build_sampler(self.sampler_spec, seed, grid)  # a bad sampler stops before the study exists
        pruner = build_pruner(self.pruner_spec)
        extend = self.search_space_extender()
        slots = self.check_launcher()
        debug = self.debug_study()
        baselines = self.check_space(params, fixed, cli_params)  # nothing is written when the space is invalid
        sweep_dir = self.sweep_dir()
        self.study_name = self.study_name or sweep_dir.name
        self.url = url = self.storage_url or f"sqlite:///{sweep_dir / 'study.db'}"
        if not self.storage_url:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        study, created = self.open_study(url, directions, pruner, baselines)
        if not created:
            self.check_space_matches(study, searched, url)
        if debug:
            self.cap_debug_budget(study)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if seed is not None and not created:  # a joining or resuming worker must not replay the first one's draws
            sampler = build_sampler(self.sampler_spec, (int(seed) + 7919 * budget_used(study) + os.getpid()) % 2**31,
                                    grid)
        study.sampler = sampler
        multi = len(objectives) > 1
        pruning = not multi and str(self.pruner_spec.get("name", "none")).lower() != "none"
        if multi and str(self.pruner_spec.get("name", "none")).lower() != "none":
            log.warning("pruning is off: Optuna cannot prune multi-objective studies (hydra.sweeper.pruner ignored)")
        env = {**self.env, STORAGE_ENV: url, PRUNER_ENV: json.dumps(self.pruner_spec)}
        worker = this_worker()
        exported = os.environ.get(STORAGE_ENV)
        if self.backend is not None:  # jobs get the database URL from the environment sbatch exports, not a file
            os.environ[STORAGE_ENV] = env.pop(STORAGE_ENV)  # put back in the `finally` below
        self.announce_slots(slots)
        groups = self.config_groups([p.key for p in params])
        log.info("study %r in %s: %s; %d of %d trials used; sweep dir %s", self.study_name, redact(url),
                 "created" if created else "resumed", budget_used(study), self.n_trials, sweep_dir)
        # the trials' trackers: MLflow's parent run (its id to every trial), TensorBoard's HParams experiment
        tracking = SweepTracking.start(self.config, study, sweep_dir, params, {
            "study_name": self.study_name, "n_trials": self.n_trials, "sampler": sampler_target(self.sampler_spec),
            "directions": directions, "objectives": [k for k, _ in objectives], "storage": redact(url),
            "sweep_dir": str(sweep_dir)})
        env.update(tracking.env())

        old_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            raise SweepInterrupted()

        signal.signal(signal.SIGTERM, on_term)
        try:
            return self.run_trials(study, grid, slots, fixed, params, sweep_dir, env, pruning, worker, objectives,
                                   extend)
        finally:
            signal.signal(signal.SIGTERM, old_term)
            if self.backend is not None and exported is None:
                os.environ.pop(STORAGE_ENV, None)
            elif self.backend is not None:
                os.environ[STORAGE_ENV] = exported
            self.finish(study, sweep_dir, params, groups, url, objectives)
            stopped = sys.exc_info()[0]
            tracking.finish(study, sweep_dir, params, "FINISHED" if stopped is None else "KILLED"
                            if issubclass(stopped, KeyboardInterrupt) else "FAILED")

    def check_space(self, params: list[sp.Param], fixed: list[str], cli_params: Mapping[str, Any]) -> list[Any]:
        """The whole space before any trial (every draw composes and passes the task's checks); returns the
        baselines, whose values for keys the command line pins give way to it."""
        started = time.monotonic()
        checker = SpaceChecker(params, fixed, self.compose, self.config, group_options=self.group_options)
        pinned = {p.key for p in params if p.key in cli_params and p.distribution is None}
        baselines = [{k: v for k, v in b.items() if k not in pinned} if isinstance(b, Mapping) else b
                     for b in self.baselines]
        dropped = sorted({k for b in self.baselines if isinstance(b, Mapping) for k in b if k in pinned})
        if dropped:
            log.info("the baselines' values for %s give way to the command line's", ", ".join(dropped))
        baselines = checker.run(baselines)
        report = checker.report
        log.info("search space checked in %.1f s: %d draws%s compose and pass the task's checks (%d config "
                 "compositions)", time.monotonic() - started, report.draws,
                 "" if report.exhaustive else " (every model/fusion combination, each other value once)",
                 report.compositions)
        return baselines

    def cap_debug_budget(self, study: optuna.Study) -> None:
        """debug=fast: a few trials more in the debug study, never more than hydra.sweeper.n_trials asks for."""
        runs = min(self.n_trials, DEBUG_TRIALS)
        capped = f" (hydra.sweeper.n_trials={self.n_trials} is capped)" if self.n_trials > DEBUG_TRIALS else ""
        log.info("debug=fast: this sweep runs at most %d trial(s)%s in the study %r, apart from the real one",
                 runs, capped, self.study_name)
        self.n_trials = budget_used(study) + runs

    def announce_slots(self, slots: list[dict[str, str]]) -> None:
        """Say how trials run at once: as cluster jobs, or K local slots with their devices and threads."""
        if self.backend is not None:
            log.info("%d trial(s) at once as %s jobs of hydra/launcher=%s", self.n_jobs, self.backend.cluster,
                     self.backend.choice)
        elif self.n_jobs > 1:
            log.info("%d trial(s) at once; %s", self.n_jobs,
                     "; ".join(" ".join(f"{k}={v}" for k, v in slot.items()) for slot in slots))

    def ask(self, study: optuna.Study) -> optuna.trial.Trial | None:
        """The next trial within the budget, with SIGTERM held from `ask` until start_trial's bookkeeping (a
        SIGTERM in between would leave the trial RUNNING); None when the budget is spent."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            trial = ask_within_budget(study, self.storage, self.n_trials)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            raise
        if trial is None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return trial

    def run_trials(self, study: optuna.Study, grid: Any, slots: list[dict[str, str]], fixed: list[str],
                   params: list[sp.Param], sweep_dir: Path, env: dict[str, str], pruning: bool, worker: str,
                   objectives: list[tuple[str, str]], extend: Any = None) -> list[dict[str, Any]]:
        """Keep up to n_jobs trials running (one per slot), each watched by its own thread; this thread asks,
        starts and collects, so SIGTERM and Ctrl-C reach it. Past the failure limit no trial is started and the
        running ones end first; when the sweeper is stopped, every running trial is stopped and recorded."""
        results: list[dict[str, Any]] = []
        free = list(range(len(slots)))
        running: dict[Future, int] = {}
        stop = threading.Event()
        failed: SweepFailed | None = None
        spent = False
        pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="trial")
        try:
            while True:
                while free and not spent and failed is None and (
                        self.worker_trials is None or len(results) + len(running) < self.worker_trials):
                    if heartbeat_enabled(self.storage):
                        optuna.storages.fail_stale_trials(study)
                    if grid is not None and study.sampler.is_exhausted(study):
                        log.info("the grid is exhausted")
                        spent = True
                        break
                    trial = self.ask(study)
                    if trial is None:
                        spent = True
                        break
                    slot = free.pop(0)
                    started = self.start_trial(study, trial, fixed, params, sweep_dir, env, pruning, worker,
                                               slots[slot], extend)
                    running[pool.submit(self.finish_trial, study, started, objectives, stop)] = slot
                if not running:
                    break
                done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    free.append(running.pop(future))
                    results.append(future.result())
                    try:
                        self.check_failure_rate(study, sweep_dir)
                    except SweepFailed as err:
                        failed = failed or err
            if failed is not None:
                raise failed
            return results
        except BaseException:
            stop.set()  # each running trial is stopped and recorded by its own thread
            for future in list(running):
                with contextlib.suppress(BaseException):
                    future.result()
            raise
        finally:
            pool.shutdown(wait=True)

    def abandon(self, study: optuna.Study, trial: optuna.trial.Trial, reason: str, interrupted: bool) -> None:
        """A trial asked but not run to its end through no fault of its own: FAIL it at once with the reason,
        outside the budget, and enqueue it again if it was a baseline (so every baseline runs once)."""
        try:
            trial.set_user_attr(INTERRUPTED_ATTR if interrupted else NOT_RUN_ATTR, True)
            trial.set_user_attr("error", reason[-4000:])
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            requeued = requeue_baseline(study, trial.number)
        except Exception as err:  # the database may be what failed; the heartbeat check fails the trial later
            log.warning("trial %d could not be recorded as FAIL (%s)", trial.number, err)
            return
        log.warning("trial %d %s (%s); it uses no budget%s", trial.number,
                    "interrupted" if interrupted else "not run", reason.splitlines()[0] if reason else "",
                    " and its baseline is enqueued again" if requeued else ", and the next run replaces it")

    @contextlib.contextmanager
    def abandoned_on_error(self, study: optuna.Study, trial: optuna.trial.Trial, interrupted: str) -> Iterator[None]:
        """Whatever stops a trial before its result is told FAILs it at once (see `abandon`), then goes on up."""
        try:
            yield
        except KeyboardInterrupt:
            self.abandon(study, trial, interrupted, interrupted=True)
            raise
        except BaseException as err:
            self.abandon(study, trial, f"the sweeper could not run this trial: {type(err).__name__}: {err}",
                         interrupted=False)
            raise

    def start_trial(self, study: optuna.Study, trial: optuna.trial.Trial, fixed: list[str], params: list[sp.Param],
                    sweep_dir: Path, env: dict[str, str], pruning: bool, worker: str,
                    slot: dict[str, str] | None = None, extend: Any = None) -> StartedTrial:
        """Draw the trial's values and record where it runs (in the thread that asked it)."""
        storage = self.storage
        run_dir = sweep_dir / f"trial_{trial.number:04d}"
        with self.abandoned_on_error(study, trial, "the sweeper was interrupted before this trial started"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by `ask`
            tid = trial_id(storage, study, trial.number)
            heartbeat = (lambda: storage.record_heartbeat(tid)) if heartbeat_enabled(storage) else None
            if heartbeat:
                heartbeat()
            chosen = sp.suggest(trial, params, self.config)
            if extend is not None:  # hydra-optuna-sweeper's custom_search_space: what it suggests joins the draw
                extend(self.config, trial)
                added = {k: v for k, v in trial.params.items() if k not in chosen}
                params = [*params, *(sp.Param(k, fixed=v) for k, v in added.items())]
                chosen = {**chosen, **added}
            searched = {k: v for k, v in chosen.items() if k in trial.params}
            overrides = self.trial_overrides(fixed, chosen, params, (tid, trial.number) if pruning else None)
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("overrides", [o for o in overrides if "optuna_pruning" not in o])
            for key, attr in (("CUDA_VISIBLE_DEVICES", "devices"), ("OMP_NUM_THREADS", "threads")):
                if slot and key in slot:
                    trial.set_user_attr(attr, slot[key])
            log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in searched.items()))
        # the trial's trackers tag their run with the study and trial (segplat.engine.loggers reads these)
        env = {**env, STUDY_ENV: study.study_name, TRIAL_ENV: str(trial.number), **(slot or {})}
        return StartedTrial(trial, tid, run_dir, overrides, searched, env, heartbeat)

    def run_one(self, study: optuna.Study, trial: optuna.trial.Trial, fixed: list[str], params: list[sp.Param],
                sweep_dir: Path, env: dict[str, str], pruning: bool, worker: str,
                objectives: list[tuple[str, str]], extend: Any = None) -> dict[str, Any]:
        """One trial from start to its recorded end, in this thread."""
        started = self.start_trial(study, trial, fixed, params, sweep_dir, env, pruning, worker, extend=extend)
        return self.finish_trial(study, started, objectives)

    def finish_trial(self, study: optuna.Study, started: StartedTrial, objectives: list[tuple[str, str]],
                     stop: threading.Event | None = None) -> dict[str, Any]:
        """Run a started trial to its end and tell the study (in the trial's thread with n_jobs > 1)."""
        storage, trial, tid, run_dir = self.storage, started.trial, started.tid, started.run_dir
        searched = started.searched

        def on_start(facts: dict[str, Any]) -> None:
            for key, value in facts.items():  # e.g. slurm_job_id, while the job waits and runs
                trial.set_user_attr(key, value)
            if facts:
                log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in facts.items()))

        start = LocalTrial if self.backend is None else \
            functools.partial(self.backend.start, name=f"{self.study_name}-{trial.number}")
        # SweepInterrupted in this thread, TrialStopped in a trial's thread
        with self.abandoned_on_error(study, trial, "the sweeper was interrupted while this trial ran"):
            res = run_trial([*self.task_args(), *started.overrides], run_dir, started.env, self.launcher_cmd,
                            self.task_module, self.trial_timeout, started.heartbeat,
                            heartbeat_every=max(1.0, float(self.heartbeat_interval or 30) / 2),
                            stderr_lines=self.stderr_lines, stop=stop, on_start=on_start, start=start)
        if storage.get_trial(tid).state.is_finished():
            log.warning("trial %d was finished by another worker while it ran (its heartbeat lapsed: raise "
                        "hydra.sweeper.heartbeat_interval); its run folder %s is kept, the study is not changed",
                        trial.number, run_dir)
            return {"number": trial.number, "params": searched, "run_dir": str(run_dir), "state": "LOST"}
        trial.set_user_attr("returncode", res.returncode)
        for key, value in res.facts.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("seconds", round(res.seconds, 2))
        summary = res.summary or {}
        status = summary.get("status")
        if status is not None:
            trial.set_user_attr("status", status)
        record = {"number": trial.number, "params": searched, "run_dir": str(run_dir), "status": status}
        if res.timed_out:
            return self._fail(study, trial, record, f"timed out after {self.trial_timeout} s", res.stderr_tail,
                              "timed out")
        if status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned after %s epoch(s)", trial.number, summary.get("epochs_completed"))
            return {**record, "state": "PRUNED"}
        if status not in OK_STATUSES:
            why = f"status {status}" if summary else res.ended or f"exit code {res.returncode}"
            # the run's own sentence (a non-finite loss, an interrupting signal) before the last line of stderr
            cause = summary.get("stopped_reason") or res.error_line or "no output"
            return self._fail(study, trial, record, f"{why}: {cause}", res.stderr_tail, why)
        values = []
        for key, _ in objectives:
            value = summary.get(key)
            if not isinstance(value, int | float) or value != value:
                return self._fail(study, trial, record, f"summary.json has no numeric {key} (got {value!r}); did "
                                  "validation run?", res.stderr_tail, f"no {key}")
            values.append(float(value))
        study.tell(trial, values if len(values) > 1 else values[0])
        log.info("trial %d finished: %s", trial.number, ", ".join(f"{k}={v:.5g}" for (k, _), v in
                                                                  zip(objectives, values)))
        return {**record, "state": "COMPLETE", "values": values}

    def _fail(self, study: optuna.Study, trial: optuna.trial.Trial, record: dict[str, Any], cause: str,
              stderr_tail: str, reason: str) -> dict[str, Any]:
        """FAIL a trial that ran; its warning line names the cause, and its stderr.log when there is one."""
        error = f"{cause}\n{stderr_tail}".strip()
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("error", error[-4000:])
        study.tell(trial, state=TrialState.FAIL)
        stderr_log = Path(record["run_dir"]) / "stderr.log"
        log.warning("trial %d FAILED: %s%s", trial.number, cause,
                    f" (log: {stderr_log})" if stderr_log.is_file() else "")
        return {**record, "state": "FAIL", "error": error}

    def check_failure_rate(self, study: optuna.Study, sweep_dir: Path) -> None:
        rate, finished = failure_rate(study)
        if finished and rate > self.max_failure_rate:
            failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            where = "the failed trials' errors in the study"
            for t in reversed(failed):  # point at a log that exists, else at the recorded error
                stderr_log = Path(str(t.user_attrs.get("run_dir", ""))) / "stderr.log"
                if t.user_attrs.get("run_dir") and stderr_log.is_file():
                    where = str(stderr_log)
                    break
                if t.user_attrs.get("error"):
                    where = f"trial {t.number}'s error ({str(t.user_attrs['error']).splitlines()[0]})"
                    break
            raise SweepFailed(f"{rate:.0%} of {finished} finished trials failed, more than "
                              f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; read {where}, fix "
                              "the cause and run the same command again to continue the study.")

    def finish(self, study: optuna.Study, sweep_dir: Path, params: list[sp.Param], groups: set[str], url: str,
               objectives: list[tuple[str, str]]) -> None:
        try:
            summary = write_outputs(study, sweep_dir, params, groups, redact(url), [k for k, _ in objectives])
        except Exception as err:  # outputs must never hide the sweep's own outcome
            log.warning("could not write the sweep outputs: %s", err)
            return
        log.info("study %r: %s; outputs in %s", self.study_name, counts(study), sweep_dir)
        for best in summary.get("best_trials", []):
            log.info("best trial %d: %s -> %s", best["number"], best["values"], best["params"])
        log.info("inspect: optuna trials --storage %s --study-name %s", redact(url), self.study_name)


class SweepFailed(SegplatError):
    """Too many trials failed: the sweep stops (the study keeps everything for a rerun)."""


def _shown(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return f"choice{tuple(distribution.choices)}"
    return f"[{distribution.low}, {distribution.high}]"  # type: ignore[attr-defined]
