"""`python -m segplat.train [overrides]`: train a model; returns the monitored score (for sweepers).

Thin on purpose: everything is built by `instantiate` from the config groups; the loop lives in
`segplat.engine.Trainer`. Checks that need no data (fusion vs model, resume path, positive
numbers) run before the dataset is prepared or read.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from segplat.config import check_config, register_resolvers
from segplat.models.build import build_model
from segplat.utils.seed import seed_everything
from segplat.utils.task import run_dir_of, save_resolved_config, task_wrapper

log = logging.getLogger("segplat")
register_resolvers()


def build_callbacks(cfg: DictConfig) -> list[Any]:
    skip = {"monitor", "mode"}
    return [instantiate(node) for key, node in cfg.callbacks.items() if key not in skip and node is not None
            and "_target_" in node]


def build_loggers(cfg: DictConfig, run_dir, resume_ids: dict[str, str | None]) -> list[Any]:
    from segplat.engine.loggers import WandbLogger

    w = cfg.logger.wandb
    if not w.enabled or w.mode == "disabled":
        return []
    return [WandbLogger(run_dir, OmegaConf.to_container(cfg, resolve=True), enabled=True, mode=w.mode,
                        project=w.project, entity=w.entity, group=w.group, tags=list(w.tags or []),
                        run_id=resume_ids.get("WandbLogger"), name=run_dir.name)]


def train(cfg: DictConfig) -> float:
    check_config(cfg)
    run_dir = run_dir_of(cfg)
    seed_everything(int(cfg.seed))
    trainer = instantiate(cfg.trainer)
    resume_from = trainer.resume_checkpoint_path(run_dir)  # a bad resume path stops before any data is read
    acc = trainer.accelerator
    datamodule = instantiate(cfg.dataset)
    info = datamodule.setup(acc)
    model_cls = get_class(cfg.model._target_)
    model = build_model(cfg.model, info.modalities, info.num_classes, {m: s.bands for m, s in info.specs.items()})
    loss = instantiate(cfg.loss)
    loss.set_ignore_index(info.ignore_index)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, run_dir)
    resume_ids: dict[str, str | None] = {}
    if resume_from is not None and acc.is_main_process:
        from segplat.engine.checkpoint import load_checkpoint

        resume_ids = load_checkpoint(resume_from).get("loggers", {}) or {}
    loggers = build_loggers(cfg, run_dir, resume_ids) if acc.is_main_process else []
    fusion = cfg.model.get("fusion", cfg.fusion)  # presets such as cmx fix their own fusion
    meta = {"model_target": f"{model_cls.__module__}.{model_cls.__qualname__}", "classes": list(info.classes),
            "modalities": dict(info.modalities), "fusion": OmegaConf.to_container(fusion, resolve=True)}
    data_state = {"classes": list(info.classes), "palette": info.palette, "ignore_index": info.ignore_index,
                  "modalities": {m: s.to_attrs() for m, s in info.specs.items()}, "stats": info.stats,
                  "patch_size": datamodule.patch_size, "dataset": datamodule.name}
    try:
        score = trainer.fit(
            model, datamodule, loss, instantiate(cfg.optimizer),
            instantiate(cfg.scheduler) if cfg.get("scheduler") else None, run_dir,
            callbacks=build_callbacks(cfg), monitor=cfg.callbacks.monitor, mode=cfg.callbacks.mode,
            loggers=loggers, meta=meta,
            extra_state={"data": data_state, "config": OmegaConf.to_yaml(cfg, resolve=True)},
        )
    finally:
        for lg in loggers:
            lg.finish()
    return score


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return task_wrapper(train)(cfg)


if __name__ == "__main__":
    main()
