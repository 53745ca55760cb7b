"""Study plumbing: storage, samplers, pruners, and a trial budget that holds across workers.

The budget. Every worker (a sweeper process, on this machine or another) shares one study in an
RDB storage. Before asking for a trial a worker counts the trials that use the budget (RUNNING,
COMPLETE, PRUNED and FAIL, less failures that were retried or interrupted by the user) and stops
when the count reaches `n_trials`. Two workers can pass that check at once, so after `study.ask()`
the worker checks again: RDB storages number trials in insertion order inside one transaction, so
"how many budget trials have a number <= mine" is the same answer for every worker. A trial whose
rank is past the budget is given back at once, before anything is sampled (its state set back to
WAITING, so a later, larger budget reuses it rather than leaving a failed trial behind). Optuna's
own `MaxTrialsCallback` only stops after a trial ends, so concurrent workers can overshoot it.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from segplat.errors import ConfigError

log = logging.getLogger(__name__)

INTERRUPTED_ATTR = "segplat_interrupted"


def redact(url: str) -> str:
    """A storage URL without its password, for logs and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 retry_failed: int = 0) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for its lock instead of failing when workers write at once."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs["heartbeat_interval"] = int(heartbeat_interval)
        kwargs["grace_period"] = int(grace_period) if grace_period else None
        if retry_failed:  # Optuna 5 renamed the callback and its argument; Optuna 4 has only the old names
            params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
            if "heartbeat_stale_trial_callback" in params and hasattr(optuna.storages,
                                                                      "RetryHeartbeatStaleTrialCallback"):
                kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=int(retry_failed))
            else:
                kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=int(retry_failed))
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except ImportError as err:
            raise ConfigError(f"hydra.sweeper.storage={redact(url)} needs a database driver that is not installed "
                              f"({err}); install it (e.g. pip install psycopg2-binary).") from err
        except (IntegrityError, OperationalError):
            # workers starting together on a new database race to create its tables and version
            # stamp; the loser retries and then finds them in place
            if attempt == 5:
                raise
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "gp": "GPSampler",
    "cmaes": "CmaEsSampler",
    "grid": "GridSampler",
    "nsga2": "NSGAIISampler",
    "qmc": "QMCSampler",
}
SAMPLER_NEEDS = {"gp": "scipy", "cmaes": "cmaes"}


def _filtered_kwargs(cls: type, kwargs: Mapping[str, Any], what: str) -> dict[str, Any]:
    accepted = set(inspect.signature(cls.__init__).parameters)
    out = {}
    for k, v in kwargs.items():
        if k in accepted:
            out[k] = v
        else:
            log.warning("%s.%s is not an option of %s; ignored.", what, k, cls.__name__)
    return out


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for the sweeper's ask/tell loop: optuna's `after_trial` calls `study.stop()` when the grid is used
    up, which optuna allows only inside `study.optimize` (outside it the last `tell` raises after storing the result);
    the loop stops on `is_exhausted()` itself."""

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        return None


def build_sampler(spec: Mapping[str, Any], seed: int | None,
                  grid: dict[str, list[Any]] | None = None) -> optuna.samplers.BaseSampler:
    """`{name: tpe|random|gp|cmaes|grid|nsga2|qmc, seed: ..., <constructor options>}`."""
    spec = dict(spec)
    name = str(spec.pop("name", "tpe")).lower()
    spec.pop("seed", None)
    if name not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler.name={name} is not known; use one of {', '.join(SAMPLERS)}.")
    if name in SAMPLER_NEEDS:
        import importlib.util

        module = SAMPLER_NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"hydra.sweeper.sampler.name={name} needs the {module} package; "
                              f"pip install {module}, or choose tpe or random.")
    cls = AskTellGridSampler if name == "grid" else getattr(optuna.samplers, SAMPLERS[name])
    kwargs = _filtered_kwargs(cls, spec, "hydra.sweeper.sampler")
    if name == "grid":
        kwargs["search_space"] = grid or {}
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs["seed"] = seed
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hydra.sweeper.sampler ({name}) rejects its options: {err}; fix them.") from err


PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "threshold": "ThresholdPruner",
    "wilcoxon": "WilcoxonPruner",
    "none": "NopPruner",
}


def build_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """`{name: median|percentile|hyperband|successive_halving|threshold|none, <constructor options>}`."""
    spec = dict(spec or {"name": "none"})
    name = str(spec.pop("name", "median")).lower() if spec.get("name") is not None else "none"
    spec.pop("name", None)
    if name not in PRUNERS:
        raise ConfigError(f"hydra.sweeper.pruner.name={name} is not known; use one of {', '.join(PRUNERS)}.")
    cls = getattr(optuna.pruners, PRUNERS[name])
    kwargs = _filtered_kwargs(cls, spec, "hydra.sweeper.pruner")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hydra.sweeper.pruner ({name}) rejects its options: {err}; fix them.") from err


def heartbeat_enabled(storage: Any) -> bool:
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter is not None and getter() is not None


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that the retry callback has re-enqueued (they give their budget slot on)."""
    out = set()
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        origin = t.system_attrs.get("failed_trial")
        out.update(int(n) for n in [*history, *([origin] if origin is not None else [])])
    return out


def uses_budget(t: optuna.trial.FrozenTrial, retried: set[int]) -> bool:
    if t.state == TrialState.WAITING:
        return False
    return not (t.state == TrialState.FAIL and (t.number in retried or bool(t.user_attrs.get(INTERRUPTED_ATTR))))


def budget_used(study: optuna.Study, up_to_number: int | None = None) -> int:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if uses_budget(t, retried) and (up_to_number is None or t.number <= up_to_number))


def ask_within_budget(study: optuna.Study, n_trials: int) -> optuna.trial.Trial | None:
    """A new trial, or None when the shared budget is spent (see the module docstring)."""
    if budget_used(study) >= n_trials:
        return None
    trial = study.ask()
    return trial if admit(study, trial, n_trials) else None


def admit(study: optuna.Study, trial: optuna.trial.Trial, n_trials: int) -> bool:
    """The check after `ask`: False (and the trial given back as WAITING) when it is past the budget."""
    if budget_used(study, up_to_number=trial.number) <= n_trials:
        return True
    # another worker took the last slot between our check and our ask: give the trial back
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.WAITING)
    log.info("trial %d given back: the budget of %d trials was reached by another worker", trial.number, n_trials)
    return False


def counts(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def failure_rate(study: optuna.Study) -> tuple[float, int]:
    """(failed / finished, finished), ignoring failures that were retried or interrupted."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    finished = [t for t in trials if t.state.is_finished() and uses_budget(t, retried)]
    failed = [t for t in finished if t.state == TrialState.FAIL]
    return (len(failed) / len(finished) if finished else 0.0), len(finished)
