"""Shared fixtures: an isolated cache/log dir per test session, Hydra compose helpers, torch threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "segplat" / "conf"

# one test process per core under pytest-xdist (`-n auto`): each takes its share of the cores, so that the processes'
# torch threads do not wait on each other (on 2 cores the local loop took 230 s in one process, 82 s in two)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
# torch's process-wide float32 precision as the session starts: no import and no test may change it (TerraTorch's
# import sets "medium", bf16 matmuls on CPU, which once made unrelated tolerance tests fail in the full run)
FP32_PRECISION = torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `-n`, the files with the most slow tests go first, so that the long ones start early and the short ones
    fill the processes at the end (a file stays in one process; every process sorts the same list the same way)."""
    if not config.getoption("numprocesses", None):
        return
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    order = {path: rank for rank, path in enumerate(slow)}
    items.sort(key=lambda item: (-slow[item.path], order[item.path]))


@pytest.fixture(autouse=True)
def _fp32_precision_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    assert (torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision) == FP32_PRECISION, (
        f"float32 matmul precision changed before {request.node.nodeid} (at collection or by an earlier test)")
    yield
    now = torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision
    torch.set_float32_matmul_precision(FP32_PRECISION[0])
    torch.backends.mkldnn.matmul.fp32_precision = FP32_PRECISION[1]
    assert now == FP32_PRECISION, f"{request.node.nodeid} changed torch's float32 matmul precision to {now}"


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stores and runs go to a temp dir; wandb never touches the network."""
    cache = tmp_path_factory.mktemp("segplat_cache")
    old = {k: os.environ.get(k) for k in ("SEGPLAT_CACHE", "WANDB_MODE", "WANDB_SILENT")}
    os.environ["SEGPLAT_CACHE"] = str(cache)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def compose_train(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as the CLI would (without Hydra's run-time), with a fixed output dir."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides or []), return_hydra_config=False)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


# a tiny, fast setting of the synthetic dataset for tests (also used by the CLI tests)
TINY = [
    "dataset.layout.num_train=8",
    "dataset.layout.num_val=4",
    "dataset.layout.scene_size=64",
    "dataset.tile_size=64",
    "dataset.patch_size=32",
    "dataset.batch_size=4",
    "dataset.val_batch_size=4",
    "dataset.num_workers=0",
    "model.encoder.name=resnet10t",
    "model.decoder.channels=[16,16,16,16]",
    "logger=none",
    "trainer.progress=false",
]
