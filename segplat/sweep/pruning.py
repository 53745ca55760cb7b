"""The trial-side half of pruning: a trainer callback that reports to the study and stops a bad run.

The sweeper starts each trial as its own process and adds this callback with
`+callbacks.optuna_pruning._target_=segplat.sweep.pruning.OptunaPruningCallback` plus the study
name and trial id as overrides (visible in the run's config.yaml). The storage URL and the pruner
come through environment variables (`SEGPLAT_OPTUNA_STORAGE`, `SEGPLAT_OPTUNA_PRUNER`, JSON), so
a database password never lands in a run folder, and torchrun's ranks inherit them.

After each validation the main process reports the monitored metric at step = completed epochs
and asks the pruner; the decision is broadcast so every rank stops together, and a pruned run
ends at once with `StopTraining(status="pruned")`; the sweeper then records the trial PRUNED.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any

from segplat.engine.callbacks import Callback
from segplat.engine.trainer import StopTraining
from segplat.errors import ConfigError

if TYPE_CHECKING:
    from segplat.engine.trainer import Trainer

log = logging.getLogger(__name__)

STORAGE_ENV = "SEGPLAT_OPTUNA_STORAGE"
PRUNER_ENV = "SEGPLAT_OPTUNA_PRUNER"


class OptunaPruningCallback(Callback):
    """Reports `trainer.monitor` to an Optuna trial after every validation; prunes when told to."""

    name = "optuna_pruning"

    def __init__(self, study_name: str, trial_id: int, trial_number: int | None = None,
                 storage: str | None = None, pruner: dict[str, Any] | None = None) -> None:
        self.study_name = str(study_name)
        self.trial_id = int(trial_id)
        self.trial_number = trial_number
        self.storage_url = storage or os.environ.get(STORAGE_ENV)
        if not self.storage_url:
            raise ConfigError(f"callbacks.optuna_pruning needs the study storage; set {STORAGE_ENV} or "
                              "callbacks.optuna_pruning.storage (the sweeper sets it for its trials).")
        if pruner is None:
            raw = os.environ.get(PRUNER_ENV)
            pruner = json.loads(raw) if raw else {"name": "median"}
        self.pruner_spec = dict(pruner)
        self._study = None
        self._storage = None

    def _connect(self):
        if self._study is None:
            import optuna

            from segplat.sweep.study import build_pruner, make_storage

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._storage = make_storage(self.storage_url)
            self._study = optuna.load_study(study_name=self.study_name, storage=self._storage,
                                            pruner=build_pruner(self.pruner_spec),
                                            sampler=optuna.samplers.RandomSampler())
        return self._study, self._storage

    def _decide(self, value: float | None, step: int) -> bool:
        """Report and ask the pruner. The trial was asked by the sweeper's process, and Optuna's Trial API
        only serves the process that asked it, so this goes through the storage interface (the trial's
        intermediate value) and the pruner's public `prune(study, trial)`, as `Trial.should_prune` does."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        import optuna

        study, storage = self._connect()
        try:
            storage.set_trial_intermediate_value(self.trial_id, step, float(value))
        except optuna.exceptions.UpdateFinishedTrialError:
            # another worker failed this trial (its heartbeat lapsed); train on, the sweeper keeps the result
            log.warning("Optuna trial %s is already finished in the study; not reporting", self.trial_number)
            return False
        return bool(study.pruner.prune(study, storage.get_trial(self.trial_id)))

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        acc = trainer.accelerator
        step = int(trainer.state.epoch)
        value = metrics.get(trainer.monitor)
        prune = self._decide(value, step) if acc.is_main_process else False
        if acc.num_processes > 1:  # one decision for all ranks, or they would wait on each other
            from accelerate.utils import broadcast_object_list

            box = [prune]
            broadcast_object_list(box, from_process=0)
            prune = bool(box[0])
        if prune:
            raise StopTraining(f"pruned by Optuna at epoch {step}: {trainer.monitor}={value:.4f}", status="pruned")
