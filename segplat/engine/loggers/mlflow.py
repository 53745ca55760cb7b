"""MLflow through its client: a local SQLite store under logs/ by default, or any tracking URI.

A run's best model is logged as an MLflow model (PyTorch flavour, `segplat.engine.loggers.mlflow_model`) at its
end, and registered under `register_as` when given. A sweep is one parent run (`SweepRun`, driven by the
sweeper: study, search space, budget, best value and parameters, the sweep's plots and the best trial's model)
with each trial a nested child run (`mlflow.parentRunId`, passed to the trials through PARENT_ENV).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from segplat.engine.loggers.base import (
    GOOD_ENDS,
    RunInfo,
    Tracker,
    numeric,
    require,
)
from segplat.errors import ConfigError
from segplat.messages import first_line, redact
from segplat.schema import Hint

log = logging.getLogger("segplat")


# MLflow accepts these characters in metric and parameter names; anything else becomes "_"
_MLFLOW_NAME = re.compile(r"[^\w\-. /:]")
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "pruned": "FINISHED", "killed": "KILLED",
                 "interrupted": "KILLED"}
# set by the sweeper in a trial's environment: the sweep's MLflow run, the trial's parent
PARENT_ENV = "SEGPLAT_MLFLOW_PARENT_RUN"


class MlflowLogger(Tracker):
    """MLflow through its client. Without `tracking_uri`: a local store shared by every run of the log folder
    (`<store_dir>/mlflow.db` + `<store_dir>/mlartifacts`), so `mlflow ui --backend-store-uri sqlite:///<store_dir>/
    mlflow.db` shows them all. With `tracking_uri` (an `http(s)://` server, `sqlite:///...`, `postgresql://...`,
    or `file:...` with MLFLOW_ALLOW_FILE_STORE=true): that store, and its server decides where artifacts go."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, store_dir: str | None = None, experiment_name: str = "segplat",
                 log_images: bool = True, tags: Mapping[str, Any] | None = None,
                 log_model: Annotated[bool, Hint("the best checkpoint as an MLflow model at the run's end; a "
                                                 "sweep logs its best trial's in its parent run")] = True,
                 register_as: Annotated[str | None, Hint("a model registry name")] = None) -> None:
        require("mlflow", "mlflow")
        if not tracking_uri and not store_dir:
            raise ConfigError("logger.mlflow needs tracking_uri (a server or database) or store_dir (a local folder).")
        self.store_dir = Path(store_dir).expanduser().resolve() if store_dir and not tracking_uri else None
        self.tracking_uri = tracking_uri or f"sqlite:///{self.store_dir / 'mlflow.db'}"
        self.experiment_name = str(experiment_name)
        self.images = bool(log_images)
        self.extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.log_model = bool(log_model)
        self.register_as = register_as
        self.client = None
        self.run_id: str | None = None
        self.trial = False  # a sweep trial: its sweep's parent run logs the best trial's model
        self.logged: set[tuple[str, int]] = set()  # (key, step) already in the run: not logged again

    # -- start -------------------------------------------------------------------------------------
    def start(self, run: RunInfo) -> None:
        from mlflow.exceptions import MlflowException

        self.trial = bool(run.sweep)
        try:
            experiment_id = self.connect()
            run_id = (run.resume_state or {}).get("run_id")
            if run.resuming and run_id:
                self._continue(run, run_id)
            else:
                self._create(run, experiment_id)
        except MlflowException as err:
            raise ConfigError(f"logger.mlflow: {self._where()} refused the run ({first_line(err)}); check "
                              "logger.mlflow.tracking_uri and the server's log.") from err

    def connect(self) -> str:
        """The client and the experiment's id (created on first use); a server that does not answer is refused."""
        self._check_reachable()
        with self._store_lock():
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            return self._experiment_id()

    def _where(self) -> str:
        return redact(self.tracking_uri)

    def _check_reachable(self) -> None:
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        import requests

        try:
            requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as err:
            raise ConfigError(f"logger.mlflow.tracking_uri={self._where()} does not answer ({type(err).__name__}); "
                              "start the server or fix the URI.") from err

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Sweep workers starting at once must not create the local database's tables twice."""
        if self.store_dir is None:
            yield
            return
        import fcntl

        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.store_dir / ".mlflow.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        location = (self.store_dir / "mlartifacts").as_uri() if self.store_dir is not None else None
        return self.client.create_experiment(self.experiment_name, artifact_location=location)

    def _create(self, run: RunInfo, experiment_id: str) -> None:
        self._end_orphans(run, experiment_id)
        tags = {"segplat.run_dir": str(run.run_dir), **{t: "" for t in run.tags}, **self.extra_tags}
        tags.update({f"sweep.{k}": str(v) for k, v in run.sweep.items()})
        if run.sweep and os.environ.get(PARENT_ENV):  # nested under its sweep's run in the MLflow UI
            tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        self._log_params(run.params)
        with contextlib.suppress(OSError):
            config = run.run_dir / "config.yaml"
            if config.is_file():
                self.client.log_artifact(self.run_id, str(config))

    def _end_orphans(self, run: RunInfo, experiment_id: str) -> None:
        """A start killed before its first checkpoint left a RUNNING run for this folder: mark it KILLED."""
        folder = str(run.run_dir).replace("'", "\\'")
        for old in self.client.search_runs([experiment_id], f"tags.`segplat.run_dir` = '{folder}' and "
                                           "attributes.status = 'RUNNING'"):
            self.client.set_terminated(old.info.run_id, "KILLED")
            log.info("MLflow run %s of an earlier start of %s is marked KILLED", old.info.run_id, run.run_dir)

    def _continue(self, run: RunInfo, run_id: str) -> None:
        try:
            old = self.client.get_run(run_id)
        except Exception as err:
            raise ConfigError(f"logger.mlflow: the checkpoint's MLflow run {run_id} is not in {self._where()}; resume "
                              "against the store the run started in (logger.mlflow.tracking_uri).") from err
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        for key in old.data.metrics:
            self.logged.update((key, m.step) for m in self.client.get_metric_history(run_id, key)
                               if m.step > run.resume_step)
        have = old.data.params
        changed = {k: v for k, v in run.params.items() if _mlflow_name(k) in have and have[_mlflow_name(k)] != str(v)}
        self._log_params({k: v for k, v in run.params.items() if _mlflow_name(k) not in have})
        if changed:  # MLflow keeps a parameter's first value; the resumed values are kept as one tag
            self.client.set_tag(run_id, "segplat.resumed_with", ", ".join(f"{k}={v}" for k, v in changed.items()))

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        items = [Param(_mlflow_name(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        cut = [k for k, v in params.items() if len(str(v)) > MAX_PARAM_VAL_LENGTH]
        if cut:
            log.warning("MLflow keeps %d characters per parameter: %s cut (config.yaml, an artifact, has them whole)",
                        MAX_PARAM_VAL_LENGTH, ", ".join(cut))
        for i in range(0, len(items), 100):  # MLflow's limit per batch call
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    # -- during the run ------------------------------------------------------------------------------
    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        if self.run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), v, now, step) for k, v in numeric(record).items()
                   if (_mlflow_name(k), step) not in self.logged]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.logged.update((m.key, step) for m in metrics)

    def log_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.run_id is not None and self.images:
            for path in images.values():
                self.client.log_artifact(self.run_id, str(path), artifact_path="visuals")

    def log_artifacts(self, files: Sequence[str | Path]) -> None:
        if self.run_id is not None:
            for path in files:
                self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def log_summary(self, facts: Mapping[str, Any]) -> None:
        if self.run_id is not None:
            for key, value in facts.items():
                if value is not None:
                    self.client.set_tag(self.run_id, f"segplat.{key}", str(value))
            best = facts.get("best_checkpoint")
            if self.log_model and not self.trial and best and facts.get("status") in GOOD_ENDS:
                self.log_best_model(self.run_id, best)

    def log_best_model(self, run_id: str, checkpoint: str | Path) -> str | None:
        """The checkpoint as this tracker's MLflow model in `run_id` (registered under register_as); a failure is a
        warning: the run's metrics and checkpoints do not depend on it."""
        from segplat.engine.loggers.mlflow_model import log_model

        try:
            uri = log_model(self.tracking_uri, run_id, checkpoint, self.register_as)
        except Exception as err:
            log.warning("logger.mlflow could not log %s as an MLflow model (%s: %s); the checkpoint is kept",
                        checkpoint, type(err).__name__, first_line(err))
            return None
        self.client.set_tag(run_id, "segplat.model_uri", uri)
        return uri

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def finish(self, status: str = "completed") -> None:
        if self.run_id is not None and self.client is not None:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
            self.client = None


def _mlflow_name(key: str) -> str:
    return _MLFLOW_NAME.sub("_", key)



class SweepRun:
    """A sweep's MLflow parent run, driven by the sweeper through the trials' own `logger.mlflow` settings: one run
    per study (its id kept in the study, so every worker and every resume of the study uses the same run), the
    trials its nested children."""

    STUDY_ATTR = "segplat_mlflow_parent_run"

    def __init__(self, tracker: MlflowLogger) -> None:
        self.tracker = tracker
        self.run_id: str | None = None

    @property
    def client(self) -> Any:
        return self.tracker.client

    def open(self, study_name: str, known_run_id: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) \
            -> str:
        """Continue the study's parent run, or create it; params logged once (a changed one becomes a tag)."""
        experiment_id = self.tracker.connect()
        run = None
        if known_run_id:
            try:
                run = self.client.get_run(known_run_id)
            except Exception:  # another store, or the run was deleted: a new parent for this store
                run = None
        if run is not None and run.info.experiment_id == experiment_id:
            self.run_id = known_run_id
            self.client.update_run(known_run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=study_name, tags={
                "segplat.sweep": "parent", "sweep.study_name": study_name, **tags}).info.run_id
        have = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in params.items() if _mlflow_name(k) in have and have[_mlflow_name(k)] != str(v)}
        self.tracker.run_id = self.run_id
        self.tracker._log_params({k: v for k, v in params.items() if _mlflow_name(k) not in have})
        for key, value in changed.items():
            self.client.set_tag(self.run_id, f"segplat.resumed_with.{_mlflow_name(key)}", str(value))
        return self.run_id

    def child_of(self, trial_number: int) -> str | None:
        """The MLflow run of one of the sweep's trials (its last start), if it logged one."""
        experiment_id = self.tracker._experiment_id()
        found = self.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{self.run_id}' and "
                                        f"tags.`sweep.trial_number` = '{trial_number}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    def log_best(self, number: int, value: float | list[float], params: Mapping[str, Any], completed: int,
                 checkpoint: Path | None, files: Sequence[Path]) -> None:
        """The best trial so far: its value (a metric, one step per completed trial), parameters and run as tags,
        the sweep's plots and results as artifacts, its model (once per best trial) as the sweep's MLflow model."""
        from mlflow.entities import Metric

        values = value if isinstance(value, list) else [value]
        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric("best_value" if len(values) == 1 else f"best_value_{i}",
                                                           float(v), now, completed) for i, v in enumerate(values)])
        tags = {"segplat.best_trial": str(number), **{f"best.{_mlflow_name(k)}": str(v) for k, v in params.items()}}
        child = self.child_of(number)
        if child:
            tags["segplat.best_run_id"] = child
        for key, text in tags.items():
            self.client.set_tag(self.run_id, key, text)
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        have = self.client.get_run(self.run_id).data.tags.get("segplat.model_trial")
        new_best = checkpoint is not None and checkpoint.is_file() and have != str(number)
        if self.tracker.log_model and new_best and self.tracker.log_best_model(self.run_id, checkpoint) is not None:
            self.client.set_tag(self.run_id, "segplat.model_trial", str(number))

    def close(self, status: str) -> None:
        if self.run_id is not None and self.client is not None:
            self.client.set_terminated(self.run_id, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
