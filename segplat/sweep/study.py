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
A trial that fails for a reason not its own (the sweeper was stopped while it ran, or could not
start it) uses no budget, and a baseline among them is enqueued again.

Optuna's API. The sweeper uses the Study API (ask, tell, enqueue_trial, user attributes) and, where
the Study API has nothing, the documented storage interface (`optuna.storages.BaseStorage` methods):
returning an asked trial to WAITING (`set_trial_state_values`), a trial's storage id for the trial's
own process (`get_trial_id_from_study_id_trial_number`), heartbeats (`record_heartbeat`), and, in the
trial, reporting and asking the pruner for a trial another process asked (pruning.py). No private
attribute is used; the storage interface is pinned by the tested Optuna range in pyproject.toml.
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
from segplat.messages import first_line, not_known, redact
from segplat.sweep.heartbeat import StaleTrialRecorder, SweepStorage

log = logging.getLogger(__name__)

INTERRUPTED_ATTR = "segplat_interrupted"  # FAILed because the sweeper was stopped while the trial ran
NOT_RUN_ATTR = "segplat_not_run"  # FAILed because the sweeper could not start it (the reason is in "error")


DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def _where(url: str) -> tuple[str, str]:
    """(what the database is, in words; the SQLite path or '') for error messages."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(redact(url))
    except Exception:
        return "the study database", ""
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return f"the SQLite study file {parsed.database}", str(parsed.database or "")
    port = parsed.port or DEFAULT_PORTS.get(backend, "?")
    return f"the {backend} study database at {parsed.host}:{port}", ""


def storage_error(url: str, err: BaseException) -> ConfigError:
    """One sentence for a study database that cannot be used: malformed URL, unknown kind, unreachable
    server, refused login, missing database or file, old schema. The password never appears in it."""
    from sqlalchemy.engine import make_url

    shown = f"hydra.sweeper.storage={redact(url)}"
    reason = str(getattr(err, "orig", None) or err).strip()
    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        reason = reason.replace(str(password), "***")
    first = reason.splitlines()[0] if reason else type(err).__name__
    low = reason.lower()
    where, sqlite_path = _where(url)
    example = "postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:////ABSOLUTE/PATH.db"
    name = type(err).__name__
    if name == "NoSuchModuleError":
        return ConfigError(f"{shown} names a database kind SQLAlchemy does not know ({first}); write it as {example}.")
    if name == "ArgumentError" or isinstance(err, ValueError):
        return ConfigError(f"{shown} is not a database URL SQLAlchemy can read ({first}); write it as {example}.")
    if "password authentication failed" in low or "access denied" in low or "no password supplied" in low:
        return ConfigError(f"{where} refused the login (wrong user or password: {first}); fix the credentials in "
                           f"{shown}.")
    if "does not exist" in low and "database" in low:
        return ConfigError(f"{where} has no such database ({first}); create it (e.g. createdb) or fix the database "
                           f"name in {shown}.")
    if sqlite_path and "unable to open database file" in low:
        return ConfigError(f"{where} cannot be opened (its folder does not exist or is not writable); create the "
                           f"folder or fix {shown}.")
    if sqlite_path and "not a database" in low:
        return ConfigError(f"{where} is not an SQLite database; point {shown} at a new file or an existing study.")
    if "storage upgrade" in low:
        return ConfigError(f"{where} was written by another Optuna version ({first}); run `optuna storage upgrade "
                           f"--storage URL` or use a new study database.")
    if name in ("OperationalError", "InterfaceError", "TimeoutError") or "could not connect" in low or \
            "connection refused" in low or "timeout" in low or "translate host name" in low:
        return ConfigError(f"{where} cannot be reached ({first}); start the server, or fix the host and port in "
                           f"{shown}.")
    return ConfigError(f"{where} failed ({name}: {first}); check {shown}.")


def is_storage_error(err: BaseException) -> bool:
    """Errors that come from the study database (or its URL) rather than from segplat."""
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(err, SQLAlchemyError) or "storage upgrade" in str(err)


def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 retry_failed: int = 0) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for its lock instead of failing when workers write at once.

    Every way the database can be unusable becomes one ConfigError sentence (storage_error)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError

    try:
        backend = make_url(url).get_backend_name()
    except Exception as err:
        raise storage_error(url, err) from None
    engine_kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True
        if backend in ("postgresql", "mysql", "mariadb") and "connect_timeout" not in url:
            engine_kwargs["connect_args"] = {"connect_timeout": 10}  # a silent host fails in seconds, not minutes
    kwargs: dict[str, Any] = {}
    recorder = None
    if heartbeat_interval:
        kwargs["heartbeat_interval"] = int(heartbeat_interval)
        kwargs["grace_period"] = int(grace_period) if grace_period else None
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=int(retry_failed)) if retry_failed else None
        # a trial failed for a lost heartbeat records why (heartbeat.py)
        recorder = StaleTrialRecorder(int(grace_period or 2 * int(heartbeat_interval)), retry)
        kwargs["heartbeat_stale_trial_callback"] = recorder
    for attempt in range(6):
        try:
            storage = SweepStorage(url, engine_kwargs=engine_kwargs, **kwargs)
            if recorder is not None:
                recorder.storage = storage
            return storage
        except ImportError as err:
            raise ConfigError(f"hydra.sweeper.storage={redact(url)} needs a database driver that is not installed "
                              f"({err.__cause__ or err}); install it (for PostgreSQL: pip install "
                              "psycopg2-binary).") from None
        except Exception as err:
            if not (is_storage_error(err) or isinstance(err, ValueError)):
                raise
            # workers starting together on a new database race to create its tables and version stamp;
            # the loser retries and then finds them in place. Anything else is the user's to fix.
            race = isinstance(err, IntegrityError) or any(
                word in str(err).lower() for word in ("locked", "already exists", "duplicate key"))
            if not race or attempt == 5:
                raise storage_error(url, err) from None
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


# the options of the hydra/sweeper/sampler config group (conf/hydra/sweeper/sampler/, hydra-optuna-sweeper's names);
# `nsga2` is segplat's older spelling of nsgaii. A sampler is chosen with hydra/sweeper/sampler=NAME, or any
# `_target_` (a user's own BaseSampler subclass too).
SAMPLERS = {
    "tpe": "optuna.samplers.TPESampler",
    "random": "optuna.samplers.RandomSampler",
    "gp": "optuna.samplers.GPSampler",
    "cmaes": "optuna.samplers.CmaEsSampler",
    "grid": "optuna.samplers.GridSampler",
    "nsgaii": "optuna.samplers.NSGAIISampler",
    "nsga2": "optuna.samplers.NSGAIISampler",
    "qmc": "optuna.samplers.QMCSampler",
}
SAMPLER_NEEDS = {"GPSampler": "scipy", "CmaEsSampler": "cmaes"}
KEY = "hydra.sweeper.sampler"


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for the sweeper's ask/tell loop: optuna's `after_trial` calls `study.stop()` when the grid is used
    up, which optuna allows only inside `study.optimize` (outside it the last `tell` raises after storing the result);
    the loop stops on `is_exhausted()` itself."""

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        return None


def sampler_target(spec: Mapping[str, Any]) -> str:
    """The sampler's `_target_` (the config group's), or the one segplat's older `name:` key names; both given and
    naming different samplers is refused (the group's defaults would reach the other sampler)."""
    target = spec.get("_target_")
    name = spec.get("name")
    if name is None:
        return str(target or SAMPLERS["tpe"])
    named = SAMPLERS.get(str(name).lower())
    if named is None:
        raise ConfigError(not_known(f"{KEY}.name", name, sorted(set(SAMPLERS) - {"nsga2"}),
                                    "or choose a sampler with hydra/sweeper/sampler=NAME"))
    if target is not None and str(target) != named:
        option = next(k for k, v in SAMPLERS.items() if v == named and k != "nsga2")
        raise ConfigError(f"{KEY}.name={name} names another sampler than {KEY}._target_={target}; choose the sampler "
                          f"with hydra/sweeper/sampler={option} (in a sweep file: `- override /hydra/sweeper/sampler: "
                          f"{option}` in its defaults) and drop {KEY}.name.")
    return named


def is_grid(spec: Mapping[str, Any]) -> bool:
    from hydra.utils import get_class

    try:
        return issubclass(get_class(sampler_target(spec)), optuna.samplers.GridSampler)
    except ConfigError:
        raise
    except Exception:
        return False


def build_sampler(spec: Mapping[str, Any], seed: int | None,
                  grid: dict[str, list[Any]] | None = None) -> optuna.samplers.BaseSampler:
    """The sampler of a `hydra.sweeper.sampler` node: `{_target_: optuna.samplers.TPESampler, seed: ..., <constructor
    keys>}` as the hydra/sweeper/sampler group composes it (segplat's older `{name: tpe, ...}` too). Unknown keys
    are refused naming the nearest one; a grid sampler gets the grid of the searched parameters; `seed` is the
    caller's (a joining worker reseeds)."""
    import importlib.util

    from hydra.utils import get_class, instantiate

    from segplat.schema import check_node

    target = sampler_target(spec)
    try:
        cls = get_class(target)
    except Exception as err:
        raise ConfigError(f"{KEY}._target_={target} cannot be imported ({first_line(err)}); use one of "
                          f"hydra/sweeper/sampler={', '.join(k for k in SAMPLERS if k != 'nsga2')}.") from None
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise ConfigError(f"{KEY}._target_={target} is not an Optuna sampler (a subclass of "
                          "optuna.samplers.BaseSampler).")
    module = SAMPLER_NEEDS.get(cls.__name__)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(f"{KEY}._target_={target} needs the {module} package; pip install {module}, or choose "
                          "hydra/sweeper/sampler=tpe or random.")
    if cls is optuna.samplers.GridSampler:
        cls = AskTellGridSampler
    node = {k: v for k, v in spec.items() if k not in ("name", "_partial_")}
    node["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
    check_node(KEY, {**node, "_target_": target})
    takes = inspect.signature(cls.__init__).parameters
    extra: dict[str, Any] = {}
    if issubclass(cls, optuna.samplers.GridSampler):
        extra["search_space"] = grid or {}
    if "seed" in takes:
        extra["seed"] = seed
    else:
        node.pop("seed", None)
    try:
        return instantiate({**node, **extra}, _convert_="all")
    except Exception as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{KEY} ({target}) rejects its options: {first_line(cause)}; fix them.") from None


def _filtered_kwargs(cls: type, kwargs: Mapping[str, Any], what: str) -> dict[str, Any]:
    accepted = set(inspect.signature(cls.__init__).parameters)
    out = {}
    for k, v in kwargs.items():
        if k in accepted:
            out[k] = v
        else:
            log.warning("%s.%s is not an option of %s; ignored.", what, k, cls.__name__)
    return out


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
    if name == "none":  # no pruning: the other keys (e.g. the defaults' n_startup_trials) have nothing to set
        return cls()
    kwargs = _filtered_kwargs(cls, spec, "hydra.sweeper.pruner")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hydra.sweeper.pruner ({name}) rejects its options: {err}; fix them.") from err


def heartbeat_enabled(storage: Any) -> bool:
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter is not None and getter() is not None


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> int:
    """The storage's id of a trial (what the storage interface and the trial's pruning callback address)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that the retry callback has re-enqueued (they give their budget slot on)."""
    out = set()
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        origin = t.system_attrs.get("failed_trial")
        out.update(int(n) for n in [*history, *([origin] if origin is not None else [])])
    return out


def uses_budget(t: optuna.trial.FrozenTrial, retried: set[int]) -> bool:
    """False for WAITING trials, and for failures that are not the trial's own (retried, interrupted, not run)."""
    if t.state == TrialState.WAITING:
        return False
    not_its_own = t.number in retried or bool(t.user_attrs.get(INTERRUPTED_ATTR) or t.user_attrs.get(NOT_RUN_ATTR))
    return not (t.state == TrialState.FAIL and not_its_own)


def budget_used(study: optuna.Study, up_to_number: int | None = None) -> int:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if uses_budget(t, retried) and (up_to_number is None or t.number <= up_to_number))


def ask_within_budget(study: optuna.Study, storage: optuna.storages.BaseStorage,
                      n_trials: int) -> optuna.trial.Trial | None:
    """A new trial, or None when the shared budget is spent (see the module docstring)."""
    if budget_used(study) >= n_trials:
        return None
    trial = study.ask()
    return trial if admit(study, storage, trial, n_trials) else None


def admit(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: optuna.trial.Trial,
          n_trials: int) -> bool:
    """The check after `ask`: False (and the trial given back as WAITING) when it is past the budget."""
    if budget_used(study, up_to_number=trial.number) <= n_trials:
        return True
    # another worker took the last slot between our check and our ask: give the trial back. The Study
    # API cannot return an asked trial to the queue; the storage interface's set_trial_state_values can.
    storage.set_trial_state_values(trial_id(storage, study, trial.number), state=TrialState.WAITING)
    log.info("trial %d given back: the budget of %d trials was reached by another worker", trial.number, n_trials)
    return False


def requeue_baseline(study: optuna.Study, number: int) -> bool:
    """Enqueue a baseline trial's values again (its trial was interrupted or not run); True if it was one."""
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if frozen is None or "baseline" not in frozen.user_attrs:
        return False
    params = dict(frozen.system_attrs.get("fixed_params") or frozen.params)
    # not skip_if_exists: the interrupted trial itself holds the same values
    study.enqueue_trial(params, user_attrs={"baseline": frozen.user_attrs["baseline"], "requeued_from": number})
    return True


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
