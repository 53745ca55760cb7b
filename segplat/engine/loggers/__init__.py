"""Run trackers: `metrics.jsonl` (always), MLflow, TensorBoard and wandb, one file per adapter.

`base.py` holds the contract (`Tracker`, `RunInfo`); a new tracker is one file like `jsonl.py` and one config
file under `conf/logger/` whose `_target_` names its class (from segplat or from the user's own package).
"""

from segplat.engine.loggers.base import (
    GOOD_ENDS,
    STUDY_ENV,
    TRIAL_ENV,
    RunInfo,
    Tracker,
    flatten,
    format_metrics,
    numeric,
    sweep_facts,
)
from segplat.engine.loggers.jsonl import JsonlLogger
from segplat.engine.loggers.mlflow import MlflowLogger
from segplat.engine.loggers.tensorboard import TensorBoardLogger
from segplat.engine.loggers.wandb import WandbLogger

__all__ = ["GOOD_ENDS", "STUDY_ENV", "TRIAL_ENV", "JsonlLogger", "MlflowLogger", "RunInfo", "TensorBoardLogger",
           "Tracker", "WandbLogger", "flatten", "format_metrics", "numeric", "sweep_facts"]
