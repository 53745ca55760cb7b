"""Untrained segplat checkpoints for prediction tests and benchmarks: any modality set, any grid scales.

Why not train: no shipped fake dataset has two modalities at different resolutions in a size a test can
afford, and prediction's streaming arithmetic does not care whether the weights are good, only that the
checkpoint is a real one (segplat model config, data facts, `torch.save`d state) read through
`load_for_inference`. Weights are drawn from a seed, so two processes build the same model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segplat.data.layouts.base import ModalitySpec
from segplat.data.preprocess import Preprocessor
from segplat.engine.checkpoint import DataFacts, save_checkpoint
from tests.conftest import compose_train

CLASSES = ("clear", "thick_cloud", "thin_cloud", "cloud_shadow")
PALETTE = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 0))
# a small, fast U-Net: two pyramid levels of timm's test EfficientNet (random init, nothing downloaded)
TINY_MODEL = ["model.encoder.name=test_efficientnet", "+model.encoder.out_indices=[0,1]",
              "model.decoder.channels=[8]"]


def band_stats(spec: ModalitySpec) -> dict[str, list[float]]:
    """Plausible normalisation statistics for a dtype (the preprocessor needs some)."""
    lo, hi = (0.0, 255.0) if spec.dtype == "uint8" else (0.0, 4000.0) if spec.dtype == "uint16" else (-1.0, 1.0)
    n = len(spec.bands)
    return {"mean": [(lo + hi) / 2] * n, "std": [(hi - lo) / 4] * n, "p2": [lo] * n, "p98": [hi] * n}


def balance_classes(net: torch.nn.Module, preprocessor: Preprocessor, scene: Mapping[str, np.ndarray]) -> None:
    """Shift the classifier's biases by each class's median logit on `scene`: an untrained net tends to give one
    class everywhere, which would make "the same classes" an empty check."""
    head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None][-1]
    with torch.no_grad():
        inputs = preprocessor({m: torch.from_numpy(np.ascontiguousarray(a[None])) for m, a in scene.items()})
        logits = net(inputs)["out"]
        head.bias -= logits.transpose(0, 1).flatten(1).median(dim=1).values


def write_checkpoint(path: str | Path, specs: Mapping[str, ModalitySpec], classes: Sequence[str] = CLASSES,
                     palette: Sequence[Sequence[int]] = PALETTE, model: Sequence[str] = TINY_MODEL,
                     patch_size: int = 64, seed: int = 0, calibrate: Mapping[str, np.ndarray] | None = None,
                     dataset: Mapping[str, Any] | None = None) -> Path:
    """Save an untrained model of `conf/model/unet.yaml` (early fusion) for `specs` as a segplat checkpoint.

    `calibrate` (one scene, arrays per modality): shift the head's biases so that every class wins on part of it.
    `dataset`: the stored dataset config (e.g. a layout, so that prediction can read a folder in that layout).
    """
    cfg = compose_train(["model=unet", "fusion=early", *model], output_dir=Path(path).parent)
    torch.manual_seed(seed)
    net = instantiate(cfg.model, modalities={m: len(s.bands) for m, s in specs.items()}, num_classes=len(classes))
    stats = {m: band_stats(s) for m, s in specs.items()}
    if calibrate is not None:
        balance_classes(net.eval(), Preprocessor(specs, stats, list(specs)), calibrate)
    config = {"model": OmegaConf.to_container(cfg.model, resolve=True),
              "dataset": dict(dataset or {"name": "synthetic"})}
    data = DataFacts(classes=list(classes), palette=[tuple(c) for c in palette], ignore_index=255,
                     modalities={m: s.to_attrs() for m, s in specs.items()}, stats=stats, patch_size=patch_size,
                     dataset="synthetic")
    meta = {"model_target": cfg.model._target_, "classes": list(classes),
            "modalities": {m: len(s.bands) for m, s in specs.items()}}
    return save_checkpoint(path, {"model": net.state_dict(), "data": data.to_state(), "meta": meta,
                                  "config": yaml.safe_dump(config)})
