"""Helpers for the layout tests: fake data -> store -> checks -> one training epoch, all tiny."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from hydra.utils import instantiate

from segplat.data.datamodule import DataModule
from segplat.data.store import PatchStore
from tests.conftest import compose_train

# tile 64 / patch 32 and a tiny U-Net: one epoch takes a couple of seconds on 2 cores
TINY_DATA = [
    "dataset.tile_size=64",
    "dataset.patch_size=32",
    "dataset.batch_size=4",
    "dataset.val_batch_size=4",
    "dataset.num_workers=0",
    "dataset.patches_per_tile=1",
    "trainer.progress=false",
]
TINY_TRAIN = [
    *TINY_DATA,
    "model.encoder.name=resnet10t",
    "model.decoder.channels=[16,16,16,16]",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "callbacks.monitor=val/loss",
    "callbacks.mode=min",
]


def datamodule(name: str, root: Path, *overrides: str) -> DataModule:
    cfg = compose_train([f"dataset={name}", f"dataset.root={root}", *TINY_DATA, *overrides])
    return instantiate(cfg.dataset)


def prepared(name: str, root: Path, *overrides: str) -> tuple[DataModule, PatchStore]:
    """Prepare (or reuse) the store of `name` over `root` through the DataModule, as training does."""
    dm = datamodule(name, root, *overrides)
    dm.setup(None)
    return dm, PatchStore(dm.store_path)


def train_one_epoch(name: str, root: Path, out: Path, *overrides: str) -> float:
    from segplat.train import train

    cfg = compose_train([f"dataset={name}", f"dataset.root={root}", *TINY_TRAIN, *overrides], output_dir=out)
    score = train(cfg)
    assert math.isfinite(score)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    return score


def numpy_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values (C, N) float64 -> per-band mean and std."""
    return values.mean(axis=1), values.std(axis=1)


def assert_stats(store: PatchStore, modality: str, values: np.ndarray, rtol: float = 1e-6) -> None:
    """The store's per-band mean/std/count against NumPy on the same valid pixels (C, N)."""
    st = store.stats[modality]
    mean, std = numpy_stats(values.astype(np.float64))
    np.testing.assert_allclose(st["mean"], mean, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(st["std"], std, rtol=1e-5, atol=1e-5)
    assert list(st["count"]) == [values.shape[1]] * values.shape[0]
    lo, hi = np.percentile(values.astype(np.float64), [2, 98], axis=1)
    np.testing.assert_allclose(st["p2"], lo, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(st["p98"], hi, rtol=1e-4, atol=1e-3)


def scene_from_tiles(store: PatchStore, split: str, source: str, key: str) -> np.ndarray:
    """Reassemble one sample's array from its tiles (using the windows in the tile table)."""
    group = store.split(split)
    meta = store.tiles_meta(split)
    idx = [i for i, m in enumerate(meta) if m is not None and m["source"] == source]
    assert idx, f"no tiles from {source} in {split}"
    h = max(meta[i]["window"][0] + meta[i]["window"][2] for i in idx)
    w = max(meta[i]["window"][1] + meta[i]["window"][3] for i in idx)
    first = np.asarray(group[key][idx[0]])
    out = np.zeros((*first.shape[:-2], h, w), dtype=first.dtype)
    for i in idx:
        y, x, th, tw = meta[i]["window"]
        out[..., y:y + th, x:x + tw] = np.asarray(group[key][i])[..., :th, :tw]
    return out


def assert_padding_invalid(store: PatchStore, split: str) -> None:
    """Outside each tile's window: valid False, label = ignore (padding is never data)."""
    group = store.split(split)
    for i, m in enumerate(store.tiles_meta(split)):
        if m is None:
            continue
        _, _, th, tw = m["window"]
        valid, label = np.asarray(group["valid"][i]), np.asarray(group["label"][i])
        assert not valid[th:, :].any() and not valid[:, tw:].any()
        assert (label[th:, :] == store.ignore_index).all() and (label[:, tw:] == store.ignore_index).all()
