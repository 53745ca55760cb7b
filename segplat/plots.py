"""Plots people would rather see than read: confusion matrices and training curves (PNG, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segplat.utils.io import atomic_write, read_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (rows: truth) with the fractions written in the cells."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    norm = np.divide(matrix, np.maximum(matrix.sum(axis=1, keepdims=True), 1), dtype=np.float64)
    size = 1.2 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def plot_curves(metrics_jsonl: Path, path: Path, monitor: str = "val/miou") -> bool:
    """Loss and monitored-metric curves per epoch from a run's metrics.jsonl; False if nothing to plot."""
    if not metrics_jsonl.exists():
        return False
    records = read_jsonl(metrics_jsonl)  # null (absent class) reads back as NaN
    if not records:
        return False
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("train/loss", "val/loss"):
        if all(key in r for r in records):
            ax1.plot(epochs, [r[key] for r in records], marker="o", label=key)
    ax1.set_xlabel("epoch")
    ax1.set_title("loss")
    ax1.legend()
    keys = [monitor] + [k for k in sorted(records[-1]) if k.startswith("val/iou_")]
    for key in dict.fromkeys(keys):
        if all(key in r for r in records):
            ax2.plot(epochs, [r[key] for r in records], marker="o" if key == monitor else None,
                     linewidth=2.5 if key == monitor else 1, label=key)
    ax2.set_xlabel("epoch")
    ax2.set_title("validation")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return True
