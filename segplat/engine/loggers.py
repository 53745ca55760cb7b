"""Run trackers: `metrics.jsonl` (always), MLflow, TensorBoard and wandb, one thin adapter each.

`logger` is a config group of `_target_` entries, several at once (`logger=[jsonl,mlflow,tensorboard]`);
the train task builds each entry, and the trainer drives them on the main process only:

    start(run)            the run folder, name, resolved config, tags, sweep facts and, on a resume,
                          this tracker's state from the checkpoint and the step it was saved at
    log_metrics(rec, s)   every validation record at its optimiser step
    log_images(imgs, s)   prediction panels (PNG files) at their step
    log_artifacts(files)  the end-of-run plots
    log_summary(facts)    best checkpoint path and score, final status
    state_dict()          what a resume needs to continue the same tracker run (kept in last.ckpt)
    finish(status)

Every adapter logs the resolved config as flattened parameters, the `tags`, and the sweep's study name
and trial number when the run is a sweep trial. A resume continues the same tracker run (MLflow run
id, wandb id, TensorBoard folder), and a step logged before a kill and trained again after the resume
is kept once: TensorBoard purges the events from the resumed step on (`purge_step`); MLflow cannot
rewrite a metric's history, so (key, step) pairs it already holds are not logged again (an exact
resume computes the same values); a wandb run drops steps at or below its last one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segplat.errors import ConfigError
from segplat.utils.io import atomic_write_text, dumps_json

log = logging.getLogger("segplat")

# set by the sweeper in a trial's environment; `callbacks.optuna_pruning` carries the same facts when pruning
STUDY_ENV = "SEGPLAT_STUDY_NAME"
TRIAL_ENV = "SEGPLAT_TRIAL_NUMBER"
# a run ends "completed", "stopped_early" or "pruned" when it ends as it should
GOOD_ENDS = ("completed", "stopped_early", "pruned")


def format_metrics(epoch: int, max_epochs: int, metrics: Mapping[str, float], keys: list[str]) -> str:
    parts = [f"epoch {epoch}/{max_epochs}"]
    for k in keys:
        if k in metrics and metrics[k] is not None:
            v = metrics[k]
            parts.append(f"{k} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}")
    return " | ".join(parts)


def numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a record: numbers only (`step` is the x axis, not a metric)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: the config as tracker parameters."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple | Mapping):
            flat[name] = dumps_json(value, default=str)
        else:
            flat[name] = value
    return flat


def sweep_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """The study name and trial number of a sweep trial (empty for a run of its own)."""
    pruning = (config.get("callbacks") or {}).get("optuna_pruning") or {}
    study = pruning.get("study_name") or os.environ.get(STUDY_ENV)
    trial = pruning.get("trial_number")
    if trial is None and os.environ.get(TRIAL_ENV, "").isdigit():
        trial = int(os.environ[TRIAL_ENV])
    return {k: v for k, v in (("study_name", study), ("trial_number", trial)) if v is not None}


@dataclass
class RunInfo:
    """What a tracker is told when the run starts."""

    run_dir: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)
    monitor: str = "val/miou"
    resuming: bool = False
    resume_step: int = 0  # the optimiser step of the checkpoint resumed from
    resume_epoch: int = 0
    resume_state: dict[str, Any] | None = None  # this tracker's state_dict() from that checkpoint

    @property
    def params(self) -> dict[str, Any]:
        return flatten(self.config)


class Tracker:
    """A run tracker; override what the library supports. Nothing is logged before `start`."""

    name = "tracker"
    required = False  # True: an error stops the run; else the trainer warns once and carries on without it

    def start(self, run: RunInfo) -> None: ...
    def log_metrics(self, record: Mapping[str, Any], step: int) -> None: ...
    def log_images(self, images: Mapping[str, str | Path], step: int) -> None: ...
    def log_artifacts(self, files: Sequence[str | Path]) -> None: ...
    def log_summary(self, facts: Mapping[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def finish(self, status: str = "completed") -> None: ...


class JsonlLogger(Tracker):
    """One JSON object per validation in `<run>/metrics.jsonl`; always on (plots and resume read it)."""

    name = "jsonl"
    required = True

    def __init__(self) -> None:
        self.path: Path | None = None

    def start(self, run: RunInfo) -> None:
        self.path = run.run_dir / "metrics.jsonl"
        if run.resuming:
            self.truncate_after(run.resume_epoch)

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        assert self.path is not None, "start() first"
        with open(self.path, "a") as fh:
            fh.write(dumps_json(dict(record)) + "\n")  # NaN (an absent class) as null: strict JSON
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop records of epochs after the checkpoint, which will be trained again."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if int(rec.get("epoch", 0)) <= epoch:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


def require(module: str, key: str) -> None:
    """Refuse a tracker whose library is missing when the config is built, before any data is read."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"logger.{key} needs the {module} package; pip install 'segplat[tracking]' or drop "
                          f"{key} from the logger list.")


class WandbLogger(Tracker):
    """wandb, offline by default (no network; `wandb sync <run>/wandb/offline-run-*` uploads later)."""

    name = "wandb"

    def __init__(self, mode: str = "offline", project: str = "segplat", entity: str | None = None,
                 group: str | None = None, tags: Sequence[str] | None = None, job_type: str | None = None) -> None:
        if mode not in ("offline", "online"):
            raise ConfigError(f"logger.wandb.mode={mode!r} is not known; use offline or online (logger=none for no "
                              "wandb).")
        require("wandb", "wandb")
        self.mode, self.project, self.entity, self.group, self.job_type = mode, project, entity, group, job_type
        self.tags = list(tags or [])
        self.run = None
        self.step = 0

    def start(self, run: RunInfo) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = (run.resume_state or {}).get("run_id")
        config = {**run.config, "sweep": run.sweep} if run.sweep else run.config
        self.step = run.resume_step
        self.run = wandb.init(project=self.project, entity=self.entity, group=self.group or run.sweep.get("study_name"),
                              job_type=self.job_type, tags=sorted({*run.tags, *self.tags}), dir=str(run.run_dir),
                              mode=self.mode, id=run_id, resume="allow" if run_id else None, name=run.name,
                              config=config, reinit="finish_previous")

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run.id} if self.run is not None else {}

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        if self.run is not None:
            self.step = step
            self.run.log(numeric(record), step=step)

    def log_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Image(str(v)) for k, v in images.items()}, step=step)

    def log_artifacts(self, files: Sequence[str | Path]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({f"plots/{Path(f).stem}": wandb.Image(str(f)) for f in files}, step=self.step)

    def log_summary(self, facts: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in facts.items() if v is not None})

    def finish(self, status: str = "completed") -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status in GOOD_ENDS else 1)
            self.run = None


class TensorBoardLogger(Tracker):
    """TensorBoard event files in `<run>/tensorboard` (or `log_dir/<run name>`): scalars, images, config as hparams +
    text."""

    name = "tensorboard"

    def __init__(self, log_dir: str | None = None, log_images: bool = True) -> None:
        require("tensorboard", "tensorboard")
        self.log_dir = log_dir
        self.images = bool(log_images)
        self.writer = None
        self.step = 0

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a shared log_dir gets one subfolder per run (TensorBoard's layout for comparing runs): written straight
        # into it, a new run purged the events of every earlier one
        own = Path(self.log_dir) / run.name if self.log_dir else run.run_dir / "tensorboard"
        folder = Path((run.resume_state or {}).get("log_dir") or own)
        self.log_dir = str(folder)
        self.step = run.resume_step
        if run.resuming:
            purge: int | None = run.resume_step + 1  # steps after the checkpoint are trained (and logged) again
        else:  # a fresh start in a folder with events of an earlier attempt hides those
            purge = 0 if folder.is_dir() and any(folder.glob("events.out.tfevents.*")) else None
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge)
        if not run.resuming:
            self._write_config(run)

    def _write_config(self, run: RunInfo) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = {k: v if isinstance(v, int | float | str | bool) else dumps_json(v, default=str)
                  for k, v in run.params.items()}
        params.update({f"sweep.{k}": v for k, v in run.sweep.items()})
        for summary in hparams(params, {run.monitor: math.nan, "val/loss": math.nan}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + dumps_json(run.config, default=str, indent=2) + "\n```", 0)
        if run.tags:
            self.writer.add_text("tags", ", ".join(run.tags), 0)
        if run.sweep:
            self.writer.add_text("sweep", ", ".join(f"{k}: {v}" for k, v in run.sweep.items()), 0)
        self.writer.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir} if self.writer is not None else {}

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        if self.writer is not None:
            self.step = step
            for key, value in numeric(record).items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.images:
            self._add_images(images, step)

    def _add_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.writer is not None:
            for tag, path in images.items():
                self.writer.add_image(tag, read_rgb(path), step, dataformats="HWC")
            self.writer.flush()

    def log_artifacts(self, files: Sequence[str | Path]) -> None:
        """The end-of-run plots, whatever `log_images` says (it is about the prediction panels, as in MLflow)."""
        self._add_images({f"plots/{Path(f).stem}": f for f in files}, self.step)

    def log_summary(self, facts: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add_text("summary", "\n\n".join(f"{k}: {v}" for k, v in facts.items()), self.step)
            self.writer.flush()

    def finish(self, status: str = "completed") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_rgb(path: str | Path):
    """A PNG as an (H, W, 3) uint8 array."""
    import numpy as np
    from matplotlib.image import imread

    img = imread(str(path))
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)


# MLflow accepts these characters in metric and parameter names; anything else becomes "_"
_MLFLOW_NAME = re.compile(r"[^\w\-. /:]")
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "pruned": "FINISHED", "killed": "KILLED"}


class MlflowLogger(Tracker):
    """MLflow through its client. Without `tracking_uri`: a local store shared by every run of the log folder
    (`<store_dir>/mlflow.db` + `<store_dir>/mlartifacts`), so `mlflow ui --backend-store-uri sqlite:///<store_dir>/
    mlflow.db` shows them all. With `tracking_uri` (an `http(s)://` server, `sqlite:///...`, `postgresql://...`,
    or `file:...` with MLFLOW_ALLOW_FILE_STORE=true): that store, and its server decides where artifacts go."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, store_dir: str | None = None, experiment_name: str = "segplat",
                 log_images: bool = True, tags: Mapping[str, Any] | None = None) -> None:
        require("mlflow", "mlflow")
        if not tracking_uri and not store_dir:
            raise ConfigError("logger.mlflow needs tracking_uri (a server or database) or store_dir (a local folder).")
        self.store_dir = Path(store_dir).expanduser().resolve() if store_dir and not tracking_uri else None
        self.tracking_uri = tracking_uri or f"sqlite:///{self.store_dir / 'mlflow.db'}"
        self.experiment_name = str(experiment_name)
        self.images = bool(log_images)
        self.extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.client = None
        self.run_id: str | None = None
        self.logged: set[tuple[str, int]] = set()  # (key, step) already in the run: not logged again

    # -- start -------------------------------------------------------------------------------------
    def start(self, run: RunInfo) -> None:
        from mlflow.exceptions import MlflowException

        self._check_reachable()
        try:
            with self._store_lock():
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=self.tracking_uri)
                experiment_id = self._experiment_id()
            run_id = (run.resume_state or {}).get("run_id")
            if run.resuming and run_id:
                self._continue(run, run_id)
            else:
                self._create(run, experiment_id)
        except MlflowException as err:
            raise ConfigError(f"logger.mlflow: {self._where()} refused the run ({first_line(err)}); check "
                              "logger.mlflow.tracking_uri and the server's log.") from err

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

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def finish(self, status: str = "completed") -> None:
        if self.run_id is not None and self.client is not None:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
            self.client = None


def _mlflow_name(key: str) -> str:
    return _MLFLOW_NAME.sub("_", key)


def redact(uri: str) -> str:
    """A tracking URI without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
