"""What a sweep tells the trackers its trials use (their `logger` entries in the sweep's config):

- MLflow: the sweep is one parent run (`segplat.engine.loggers.mlflow.SweepRun`) holding the study's name,
  search space, budget, sampler and directions as parameters, and at each worker's end the best value and
  parameters, the sweep's plots and results, and the best trial's model (registered under
  `logger.mlflow.register_as`); every trial's run is its nested child. The parent's id is kept in the study, so
  every worker and every resume of the study continues the same run.
- TensorBoard: the HParams experiment (the searched keys with their domains, the monitored metric and its best)
  in the folder holding the trials' event files, so its HParams tab compares the trials on the searched keys.

Neither is written when the trials do not use that tracker (debug=fast, for one, turns trackers off).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from segplat.errors import ConfigError
from segplat.messages import first_line
from segplat.sweep import space as sp

log = logging.getLogger("segplat.sweep")


def _node(config: DictConfig | None, key: str) -> dict[str, Any] | None:
    node = OmegaConf.select(config, key, default=None) if config is not None else None
    if node is None or "_target_" not in node:
        return None
    return OmegaConf.to_container(node, resolve=True)


def hparam_domains(params: Sequence[sp.Param]) -> dict[str, list[Any] | tuple[float, float]]:
    """Each searched key's values (a list) or its interval (low, high), as the trials' sessions report them."""
    out: dict[str, list[Any] | tuple[float, float]] = {}
    for p in params:
        if p.distribution is None:
            continue
        values = sp.finite_values(p)
        if values is None:
            out[p.key] = (float(p.distribution.low), float(p.distribution.high))  # type: ignore[attr-defined]
        else:
            out[p.key] = [p.override_text(v) if not isinstance(v, bool | int | float) else v for v in values]
    return out


class SweepTracking:
    """Started by the sweeper once the study is open; `env()` goes to every trial; `finish` at each worker's end."""

    def __init__(self) -> None:
        self.mlflow: Any = None  # a SweepRun

    @classmethod
    def start(cls, config: DictConfig | None, study: optuna.Study, sweep_dir: Path, params: Sequence[sp.Param],
              facts: Mapping[str, Any]) -> SweepTracking:
        self = cls()
        self._start_mlflow(config, study, params, facts)
        self._write_hparams(config, sweep_dir, params)
        return self

    def _start_mlflow(self, config: DictConfig | None, study: optuna.Study, params: Sequence[sp.Param],
                      facts: Mapping[str, Any]) -> None:
        node = _node(config, "logger.mlflow")
        if node is None:
            return
        from hydra.utils import instantiate
        from mlflow.exceptions import MlflowException

        from segplat.engine.loggers.mlflow import SweepRun

        tracker = instantiate(node)
        run = SweepRun(tracker)
        space = {f"space.{p.key}": sp.describe(p) + (f" when {p.when}" if p.when else "") for p in params
                 if p.distribution is not None}
        try:
            run_id = run.open(study.study_name, study.user_attrs.get(SweepRun.STUDY_ATTR), {**facts, **space},
                              {"segplat.sweep_dir": str(facts.get("sweep_dir", ""))})
        except MlflowException as err:
            raise ConfigError(f"logger.mlflow: {tracker._where()} refused the sweep's run ({first_line(err)}); check "
                              "logger.mlflow.tracking_uri and the server's log.") from err
        if study.user_attrs.get(SweepRun.STUDY_ATTR) != run_id:
            study.set_user_attr(SweepRun.STUDY_ATTR, run_id)
        self.mlflow = run
        log.info("MLflow: the sweep is run %s in %s (experiment %s); each trial a nested run", run_id,
                 tracker._where(), tracker.experiment_name)

    @staticmethod
    def _write_hparams(config: DictConfig | None, sweep_dir: Path, params: Sequence[sp.Param]) -> None:
        node = _node(config, "logger.tensorboard")
        if node is None:
            return
        from segplat.engine.loggers.tensorboard import write_hparams_experiment

        monitor = str(OmegaConf.select(config, "callbacks.monitor", default="val/miou"))
        folder = Path(node.get("log_dir") or sweep_dir)
        write_hparams_experiment(folder, hparam_domains(params), [monitor, f"best/{monitor}"])

    def env(self) -> dict[str, str]:
        from segplat.engine.loggers.mlflow import PARENT_ENV

        return {PARENT_ENV: self.mlflow.run_id} if self.mlflow is not None else {}

    def finish(self, study: optuna.Study, sweep_dir: Path, params: Sequence[sp.Param], status: str) -> None:
        """The best trial so far into the parent run, then its status; a tracker failure is a warning here (the
        study and the sweep folder hold everything)."""
        if self.mlflow is None:
            return
        try:
            self._log_best(study, sweep_dir, params)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            self.mlflow.close("RUNNING" if status == "FINISHED" and running else status)
        except Exception as err:
            log.warning("MLflow: the sweep's run %s could not be updated (%s: %s)", self.mlflow.run_id,
                        type(err).__name__, first_line(err))

    def _log_best(self, study: optuna.Study, sweep_dir: Path, params: Sequence[sp.Param]) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        files = [sweep_dir / name for name in ("history.png", "importance.png", "pareto_front.png", "trials.csv",
                                               "optimization_results.yaml")]
        if not complete:
            return
        by_key = {p.key: p for p in params}
        multi = len(study.directions) > 1
        best = study.best_trials[0] if multi else study.best_trial
        values = list(best.values) if multi else best.value
        if not multi and (values is None or not math.isfinite(values)):
            return
        chosen = {k: by_key[k].python_value(v) if k in by_key else v for k, v in best.params.items()}
        run_dir = best.user_attrs.get("run_dir")
        checkpoint = Path(run_dir) / "checkpoints" / "best.ckpt" if run_dir and not multi else None
        if checkpoint is not None and not checkpoint.is_file():
            log.info("MLflow: the best trial's checkpoint %s is not on this machine; its model is logged by the "
                     "worker that ran it", checkpoint)
        self.mlflow.log_best(best.number, values, chosen, len(complete), checkpoint,
                             [*files, sweep_dir / "experiment" / "best.yaml"])
