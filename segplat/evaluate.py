"""`python -m segplat.evaluate ckpt=RUN split=val`: metrics and the confusion matrix of a split.

Writes `metrics.json` (per-class IoU and F1, mIoU, mean F1, pixel accuracy), `confusion_matrix.csv`
and `confusion_matrix.png` (row-normalised) to its run folder. `protocol=isprs` evaluates as the
ISPRS benchmark does: on the eroded labels (boundary pixels ignored), clutter left out of the means.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from segplat.config import CheckpointTask, check_values
from segplat.errors import ConfigError, DataError
from segplat.inference import forward_batch, load_for_inference
from segplat.metrics import ConfusionMatrix, metrics_from_confusion
from segplat.plots import plot_confusion
from segplat.predict import choose_device
from segplat.schema import Hint, check_targets, section
from segplat.utils.console import say
from segplat.utils.io import atomic_write, atomic_write_json
from segplat.utils.task import CONF_DIR, remove_if_no_results, run_dir_of, task_wrapper, with_config_hints

log = logging.getLogger("segplat")


@section
class EvaluateTask(CheckpointTask):
    """The keys of `python -m segplat.evaluate` (conf/evaluate.yaml), checked first by `run_evaluation`."""

    split: Annotated[str | None, Hint("null: the split the run validated on")] = None
    protocol: Annotated[Literal["standard", "isprs"],
                        Hint("isprs: eroded labels, clutter left out of the class means")] = "standard"
    exclude_classes: Sequence[str] = ()
    # merged onto the checkpoint's dataset config where not null (its keys are checked there, against DataModule)
    dataset: Mapping[str, Any] = field(default_factory=dict)


def means_without(metrics: dict[str, Any], exclude: Sequence[str]) -> dict[str, float]:
    """Class means over the classes not in `exclude` (the ISPRS convention leaves clutter out)."""
    keep = [c for c in metrics["per_class_iou"] if c not in set(exclude)]
    iou = [metrics["per_class_iou"][c] for c in keep if not np.isnan(metrics["per_class_iou"][c])]
    f1 = [metrics["per_class_f1"][c] for c in keep if not np.isnan(metrics["per_class_f1"][c])]
    return {"miou": float(np.mean(iou)) if iou else float("nan"), "mean_f1": float(np.mean(f1)) if f1 else float("nan"),
            "classes": keep}


def evaluate(cfg: DictConfig) -> float:
    """Score a checkpoint on a split; a refused or failed evaluation leaves no run folder behind."""
    try:
        return run_evaluation(cfg)
    except BaseException:
        remove_if_no_results(run_dir_of(cfg), "evaluate")
        raise


def run_evaluation(cfg: DictConfig) -> float:
    check_values(cfg, EvaluateTask)
    device = choose_device(cfg.device)
    loaded = load_for_inference(cfg.ckpt, device=device)
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if v is not None}
    # where stores are written comes from this machine's paths, never from the checkpoint
    ds_cfg = OmegaConf.merge(loaded.config.dataset, {"store_dir": cfg.paths.store_dir, "progress": cfg.progress},
                             overrides)
    exclude = list(cfg.exclude_classes)
    if cfg.protocol == "isprs":
        if OmegaConf.select(ds_cfg, "layout.eroded") is None:
            raise ConfigError(f"protocol=isprs needs an ISPRS dataset (vaihingen or potsdam); the checkpoint was "
                              f"trained on {ds_cfg.name}.")
        with open_dict(ds_cfg):
            ds_cfg.layout.eroded = True
        exclude = sorted(set(exclude) | {"clutter"})
    unknown = [c for c in exclude if c not in loaded.classes]
    if unknown:
        raise ConfigError(f"exclude_classes names {unknown}, which are not classes of this model ({loaded.classes}).")
    check_targets(ds_cfg, root="dataset")  # the checkpoint's dataset config with this command's keys on top
    datamodule = hydra.utils.instantiate(ds_cfg)
    info = datamodule.setup()
    if list(info.classes) != loaded.classes:
        raise ConfigError(f"the dataset's classes {info.classes} differ from the checkpoint's {loaded.classes}.")
    split = cfg.split or datamodule.val_split
    loader = datamodule.loader(split, train=False)
    cm = ConfusionMatrix(len(loaded.classes), info.ignore_index, device)
    for batch in tqdm(loader, desc=f"evaluate {split}", disable=not cfg.progress):
        logits = forward_batch(loaded.model, loaded.preprocessor, batch, device)
        cm.update(logits, batch["label"].to(device))
    if int(cm.matrix.sum()) == 0:
        raise DataError(f"split {split} of {ds_cfg.name} has no labelled pixels (a test split without labels, or "
                        f"every label ignored), so there is nothing to score; evaluate a labelled split, e.g. "
                        f"split={datamodule.val_split}.")
    metrics = metrics_from_confusion(cm.matrix, loaded.classes)
    result: dict[str, Any] = {"checkpoint": str(Path(loaded.checkpoint).resolve()), "split": split,
                              "protocol": cfg.protocol, **{k: v for k, v in metrics.items() if k != "confusion_matrix"}}
    if exclude:
        result["excluding"] = {"classes_left_out": exclude, **means_without(metrics, exclude)}
    # what the protocol reports (and a sweep or script should read): `miou` is the mean over every class
    result["headline_miou"] = result["excluding"]["miou"] if exclude else metrics["miou"]
    out = run_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", result)
    matrix = np.asarray(metrics["confusion_matrix"], dtype=np.int64)

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["true\\predicted", *loaded.classes])
            for name, row in zip(loaded.classes, matrix.tolist()):
                w.writerow([name, *row])

    atomic_write(out / "confusion_matrix.csv", write_csv)
    # the figure the protocol reports comes first (ISPRS: without clutter); the all-class mean beside it
    headline = result["excluding"]["miou"] if exclude else metrics["miou"]
    without = f" without {', '.join(exclude)}" if exclude else ""
    plot_confusion(matrix, loaded.classes, out / "confusion_matrix.png",
                   f"{ds_cfg.name} {split}: mIoU{without} {headline:.3f}")
    say(f"mIoU{without} {headline:.4f} | pixel accuracy {metrics['pixel_accuracy']:.4f} | mean F1 "
        f"{metrics['mean_f1']:.4f}" + (f" | all classes: mIoU {metrics['miou']:.4f}" if exclude else ""))
    for name in loaded.classes:
        say(f"  {name:<24} IoU {metrics['per_class_iou'][name]:.4f}  F1 {metrics['per_class_f1'][name]:.4f}")
    return float(headline)


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    return task_wrapper(evaluate)(cfg)


main = with_config_hints(hydra_main, "evaluate")  # an unknown option or key: Hydra's message + a "did you mean", exit 2

if __name__ == "__main__":
    main()
