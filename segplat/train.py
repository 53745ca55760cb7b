"""`python -m segplat.train [overrides]`: train a model; returns the monitored score (for sweepers).

Thin on purpose: everything is built by `instantiate` from the config groups; the loop lives in
`segplat.engine.Trainer`. Checks that need no data (fusion vs model, the run folder and the resume
checkpoint, trackers, positive numbers) run before the dataset is prepared or read.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from segplat.config import check_config, register_resolvers
from segplat.engine import interrupt
from segplat.engine.checkpoint import RunFacts
from segplat.engine.loggers import TRIAL_ENV, Tracker
from segplat.errors import ConfigError, DataError
from segplat.models.build import build_model
from segplat.rules import check_model_inputs, check_monitor, check_resumed_config
from segplat.utils.console import say
from segplat.utils.dist import is_main_process
from segplat.utils.seed import seed_everything
from segplat.utils.task import (
    CONF_DIR,
    choices_line,
    remove_if_no_results,
    run_dir_of,
    save_resolved_config,
    task_wrapper,
    with_config_hints,
)

log = logging.getLogger("segplat")
register_resolvers()


def build_callbacks(cfg: DictConfig) -> list[Any]:
    skip = {"monitor", "mode"}
    return [instantiate(node) for key, node in cfg.callbacks.items() if key not in skip and node is not None
            and "_target_" in node]


def build_loggers(cfg: DictConfig) -> list[Tracker]:
    """One tracker per entry of the `logger` group (`logger=[jsonl,mlflow]`); metrics.jsonl is added by the trainer
    when no entry is it. Built (not started) before any data is read, so a missing library stops the run here."""
    trackers = []
    for key, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"logger.{key} has no _target_; select trackers with logger=[jsonl,mlflow,tensorboard,"
                              "wandb] (conf/logger/) rather than setting keys of one that is not selected.")
        tracker = instantiate(node)
        tracker.name = str(key)
        trackers.append(tracker)
    return trackers


def check_sweep_mode() -> None:
    """A sweep file without --multirun trained one run with its fixed settings and searched nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or os.environ.get(TRIAL_ENV):  # composed outside Hydra, or a sweep's trial
        return
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.runtime.choices.get("sweep")
    if sweep is not None and hydra_cfg.mode == RunMode.RUN:
        raise ConfigError(f"sweep={sweep} is a search space: run it with --multirun (python -m segplat.train "
                          f"--multirun sweep={sweep} ...); without it one run would train and nothing be searched.")


def train(cfg: DictConfig) -> float:
    """Train one run; a refused or failed start leaves no run folder holding only Hydra's files."""
    run_dir = run_dir_of(cfg)
    try:
        return run_training(cfg, run_dir)
    except BaseException:
        if (run_dir / ".hydra").is_dir():  # a folder Hydra made for this command (not one a caller passed)
            remove_if_no_results(run_dir, "train")
        raise


def run_training(cfg: DictConfig, run_dir: Path) -> float:
    check_config(cfg)
    check_sweep_mode()
    if is_main_process():
        log.info("train %s: %s", run_dir, choices_line(cfg))
    seed_everything(int(cfg.seed))
    trainer = instantiate(cfg.trainer)
    start = trainer.prepare_run(run_dir)  # the run-folder rule and the resume checkpoint, before any data is read
    if (resumed := start.load()) is not None:
        check_resumed_config(resumed, cfg, start.path)
    loggers = build_loggers(cfg)
    acc = trainer.accelerator
    datamodule = instantiate(cfg.dataset)
    # the model is built from the layout's description first, so that a model refusing the data (a GFM encoder
    # that cannot map the bands, a stream count its fusion does not take) stops before a store is prepared
    expected = datamodule.describe()
    # a typo or a wrong direction stops here, not after the first epoch
    check_monitor(str(cfg.callbacks.monitor), expected.classes, str(cfg.callbacks.mode))
    check_model_inputs(get_class(cfg.model._target_), expected.specs)  # time series a model cannot take
    model = build_model(cfg.model, expected.modalities, expected.num_classes, expected.bands)
    # loss, optimiser, schedule and callbacks too: a refused key stops here, before the store is prepared
    loss = instantiate(cfg.loss)
    loss.bind_aux_outputs(model.aux_outputs, str(cfg.model._target_).rsplit(".", 1)[-1])
    loss.check_terms(expected.num_classes, expected.ignore_index)  # a term that ignores the ignore index stops here
    optimizer_factory = instantiate(cfg.optimizer)
    scheduler_factory = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    callbacks = build_callbacks(cfg)
    info = datamodule.setup(acc)
    if (list(info.bands.items()), info.classes) != (list(expected.bands.items()), expected.classes):  # in order
        raise DataError(f"the store {datamodule.store_path} holds {info.bands} and classes {info.classes}, "
                        f"but the {datamodule.name} layout describes {expected.bands} and "
                        f"{expected.classes}; prepare it again (python -m segplat.prepare ... force=true).")
    model_cls = get_class(cfg.model._target_)
    loss.set_ignore_index(info.ignore_index)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, run_dir)
    return trainer.fit(
        model, datamodule, loss, optimizer_factory, scheduler_factory, run_dir, callbacks=callbacks,
        monitor=cfg.callbacks.monitor, mode=cfg.callbacks.mode,
        loggers=loggers, facts=RunFacts.of_run(cfg, model_cls, info, datamodule),
    )


# an absolute config path: the same conf/ for `python -m segplat.train` and the `segplat-train` console script
@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    try:
        return task_wrapper(train)(cfg)
    except KeyboardInterrupt as stop:  # inside the job: the line reaches the run's log file too
        exit_interrupted(stop)


def exit_interrupted(stop: KeyboardInterrupt) -> None:
    """SIGINT / SIGTERM: one line (the trainer's, when it stopped the loop), no traceback, status 130 / 143."""
    signum = interrupt.signum_of(stop)
    if not getattr(stop, "reported", False) and is_main_process():
        say(f"stopped by {interrupt.signal_name(signum)} (outside a training loop: nothing to save)", err=True)
        stop.reported = True
    sys.exit(128 + signum)


def main() -> float:
    """`python -m segplat.train` and `segplat-train`: signals stop the task cleanly (segplat.engine.interrupt)."""
    with interrupt.signals_handled():
        try:
            return with_config_hints(hydra_main, "train")()
        except KeyboardInterrupt as stop:
            exit_interrupted(stop)


if __name__ == "__main__":
    main()
