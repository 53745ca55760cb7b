"""What the speed benchmarks share: models and data built as `segplat.train` builds them, one training step,
machine load, result files.

Run the benchmarks from the repository root as modules (`python -m benchmarks.step_time`), so that
`benchmarks.common` (and `segplat`, with PYTHONPATH=. when it is not installed) import.

This module imports neither rasterio nor OpenCV: the GPU run (benchmarks/gpu/) must work on an image without
them, so its data comes from `BenchClouds`, an in-memory layout shaped like the clouds data (uint8 RGB + NIR,
four classes) that goes through the real store, DataModule, loader and preprocessor.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "segplat" / "conf"
RESULTS = REPO / "benchmarks" / "results"

# the models of issue 19, as config overrides of conf/train.yaml (exactly what a user would pass)
MODELS: dict[str, list[str]] = {
    "unet": ["model=unet"],  # resnet18 U-Net, early fusion (rgb + nir stacked)
    "segformer_b2": ["model=segformer", "model.backbone=mit_b2"],
    "cmx_b2": ["model=cmx", "model.backbone=mit_b2"],
}
# the same parts at their smallest, for --dry-run / tests on CPU
TINY_MODELS: dict[str, list[str]] = {
    "unet": ["model=unet", "model.encoder.name=resnet10t", "model.decoder.channels=[16,16,16,16]"],
    "segformer_b2": ["model=segformer", "model.backbone=mit_b0", "model.decoder_embed_dim=32"],
    "cmx_b2": ["model=cmx", "model.backbone=mit_b0", "model.decoder_embed_dim=32"],
}


def machine_line() -> str:
    """The machine and its load, written beside every figure (figures on a loaded machine are noisy)."""
    load = os.getloadavg()
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
            f"(1 / 5 / 15 min) at {time.strftime('%Y-%m-%d %H:%M:%S')}")


def compose_train(overrides: Sequence[str] = ()) -> Any:
    """conf/train.yaml with `overrides`, composed as the CLI composes it (without Hydra's run-time)."""
    from hydra import compose, initialize_config_dir

    from segplat.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def build_model(cfg: Any, modalities: Mapping[str, int], num_classes: int) -> nn.Module:
    """The model exactly as `segplat.train` builds it: the config checks, then `instantiate(cfg.model, ...)`."""
    from hydra.utils import instantiate

    from segplat.config import check_config

    check_config(cfg)
    return instantiate(cfg.model, modalities=dict(modalities), num_classes=num_classes)


class TrainStep:
    """One optimiser step as the trainer takes it: autocast forward, composite loss, backward, clip, AdamW step.

    Built from the same config groups as a run (`cfg.loss`, `cfg.optimizer`, `cfg.trainer.gradient_clip_val`).
    `bf16` autocasts on the model's device (what `trainer.mixed_precision=bf16` does through Accelerate)."""

    def __init__(self, cfg: Any, model: nn.Module, ignore_index: int = 255, bf16: bool = False) -> None:
        from hydra.utils import instantiate

        self.model = model
        self.loss_fn = instantiate(cfg.loss)
        self.loss_fn.bind_aux_outputs(model.aux_outputs, type(model).__name__)
        self.loss_fn.set_ignore_index(ignore_index)
        self.optimizer = instantiate(cfg.optimizer)(model)
        self.clip = cfg.trainer.gradient_clip_val
        self.bf16 = bf16

    def autocast(self, device: torch.device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def __call__(self, inputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        device = label.device
        with self.autocast(device):
            outputs = self.model(inputs)
            loss, _ = self.loss_fn(outputs, label.long())
            loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def random_batch(modalities: Mapping[str, int], size: int, batch: int, num_classes: int,
                 device: torch.device | str = "cpu", seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Normalised-looking float inputs and a label, as the preprocessor hands them to the model."""
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(batch, c, size, size, generator=g).to(device) for m, c in modalities.items()}
    label = torch.randint(0, num_classes, (batch, size, size), generator=g, dtype=torch.uint8).to(device)
    return inputs, label


def forward_flops(model: nn.Module, modalities: Mapping[str, int], size: int, num_classes: int,
                  device: torch.device | str = "cpu") -> int:
    """Forward FLOPs of one image as `segplat.models.summary.count_macs` counts them (convolutions, linear layers,
    matrix products and attention; 2 FLOPs per multiply-add; they do not depend on the precision or on train /
    eval mode; eval mode lets one image pass BatchNorm at any size).

    A training step is taken as 3x this (backward = 2x forward, the usual MFU convention): torch's counter's own
    figure for backward is not used because it overcounts grouped convolutions (MiT's depthwise 3x3 in Mix-FFN:
    35x the forward cost of those convolutions in torch 2.14)."""
    from segplat.models.summary import count_macs

    inputs, _ = random_batch(modalities, size, 1, num_classes, device)
    was_training = model.training
    model.eval()
    cost = count_macs(model, inputs)
    model.train(was_training)
    return cost.flops


class BenchClouds(Layout):
    """Clouds-shaped scenes generated in memory (uint8 RGB + NIR, four classes; needs neither rasterio nor OpenCV).

    The loader's cost depends on the store, patch size, dtypes and augmentation, not on the source format, so a
    store prepared from these scenes is read exactly as one prepared from the Kaggle PNGs."""

    name = "benchclouds"
    classes = ("clear", "thick_cloud", "thin_cloud", "cloud_shadow")
    palette = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 0))
    ignore_index = 255

    def __init__(self, root: str | None = None, num_train: int = 32, num_val: int = 4, scene_size: int = 512,
                 seed: int = 0) -> None:
        super().__init__(root)
        self.num = {"train": int(num_train), "val": int(num_val)}
        self.scene_size = int(scene_size)
        self.seed = int(seed)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"rgb": ModalitySpec(("red", "green", "blue"), nodata=None, dtype="uint8"),
                "nir": ModalitySpec(("nir",), nodata=None, dtype="uint8")}

    def fingerprint_params(self) -> dict:
        return {"name": self.name, "num": self.num, "scene_size": self.scene_size, "seed": self.seed, "version": 1}

    def scan(self) -> dict[str, list[SampleRef]]:
        return {split: [SampleRef(f"{split}_{i:05d}") for i in range(n)] for split, n in self.num.items()}

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        return self.scene_size, self.scene_size

    def read(self, ref: SampleRef) -> Sample:
        rng = np.random.default_rng([self.seed, int(ref.id.rsplit("_", 1)[1]), ref.id.startswith("val")])
        n = self.scene_size
        coarse = rng.random((4, n // 32 + 1, n // 32 + 1), dtype=np.float32)
        smooth = coarse.repeat(32, axis=1).repeat(32, axis=2)[:, :n, :n]
        noisy = smooth * 200 + rng.normal(0, 12, (4, n, n)).astype(np.float32)
        image = np.clip(noisy + 20, 0, 255).astype(np.uint8)
        label = np.digitize(smooth[0], [0.4, 0.6, 0.8]).astype(np.uint8)
        return Sample(arrays={"rgb": image[:3], "nir": image[3:]}, label=label, source=f"bench:{ref.id}")


def bench_clouds_config(store_dir: str | Path, overrides: Sequence[str] = (), num_train: int = 32,
                        scene_size: int = 512) -> Any:
    """The clouds/CMX recipe (conf/dataset/clouds.yaml: patch 512, batch 8, flips/rot90, brightness/contrast) with
    its layout swapped for BenchClouds, so it runs without the Kaggle data, rasterio or OpenCV."""
    from omegaconf import open_dict

    cfg = compose_train(["dataset=clouds", "logger=none", "trainer.progress=false", *overrides])
    with open_dict(cfg):
        cfg.dataset.layout = {"_target_": "benchmarks.common.BenchClouds", "num_train": num_train, "num_val": 4,
                              "scene_size": scene_size, "seed": 0}
        cfg.dataset.requires_root = False
        cfg.dataset.store_dir = str(store_dir)
        cfg.dataset.progress = False
    return cfg


def loader_rate(datamodule: Any, workers: int, batches: int, skip: int = 2) -> dict[str, float]:
    """Patches per second through the full CPU loader (workers, crop, geometric augmentation, collate; pinned
    memory when CUDA is present, as in training), after `skip` batches (worker start-up); one epoch must hold
    `skip + batches` batches."""
    datamodule.num_workers = int(workers)
    loader = datamodule.train_loader()
    if len(loader) < skip + batches:
        raise ValueError(f"the train loader has {len(loader)} batches; {skip + batches} are needed (raise "
                         "dataset.patches_per_tile or the number of scenes)")
    it = iter(loader)
    started = time.perf_counter()
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    patches = 0
    for _ in range(batches):
        batch = next(it)
        patches += int(batch["label"].shape[0])
    seconds = time.perf_counter() - t0
    del it
    return {"workers": workers, "patches": patches, "seconds": seconds, "patches_per_s": patches / seconds,
            "per_worker": patches / seconds / max(workers, 1), "startup_s": t0 - started}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
