"""The tracker contract every adapter keeps (one file per tracker beside this one).

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

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segplat.errors import ConfigError
from segplat.utils.io import dumps_json

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
    # the command line's overrides (`key=value`, as Hydra records them); None: read from Hydra when it runs
    overrides: list[str] | None = None

    @property
    def params(self) -> dict[str, Any]:
        return flatten(self.config)

    @property
    def hparams(self) -> dict[str, bool | int | float | str]:
        """What this run varies: the keys its command line set (a sweep trial's: its draw and the sweep's fixed
        overrides), with their values in the resolved config (a config group by its option's name, a list as
        written), and the study and trial of a sweep trial. Tracker plumbing (logger, hydra, paths, resume) is
        not a hyperparameter."""
        out: dict[str, bool | int | float | str] = {}
        for text in self.overrides if self.overrides is not None else hydra_overrides():
            if text.startswith("~") or "=" not in text:
                continue
            key, written = text.split("=", 1)
            key = key.lstrip("+")
            if key.startswith(PLUMBING):
                continue
            value = lookup(self.config, key)
            out[key] = value if isinstance(value, bool | int | float | str) else written
        out.update({f"sweep.{k}": v for k, v in self.sweep.items()})
        return out


# override keys that set up where and how a run is recorded, not what it trains
PLUMBING = ("hydra.", "hydra/", "logger", "callbacks.optuna_pruning", "trainer.resume", "trainer.overwrite",
            "trainer.progress", "run_name", "paths.", "tags", "task_name")


def hydra_overrides() -> list[str]:
    """The task's command-line overrides when Hydra runs the task (empty otherwise)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []
    except Exception:  # a task composed outside Hydra's run (tests, the API)
        return []


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key of a plain config (None when it has none)."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


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



def require(module: str, key: str) -> None:
    """Refuse a tracker whose library is missing when the config is built, before any data is read."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"logger.{key} needs the {module} package; pip install 'segplat[tracking]' or drop "
                          f"{key} from the logger list.")

