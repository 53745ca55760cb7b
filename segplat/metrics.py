"""Segmentation metrics from one confusion matrix (rows = truth, columns = prediction).

The matrix is accumulated on the device with `bincount`, summed across ranks once per
validation, and every reported number (per-class IoU, mIoU, pixel accuracy, per-class F1)
derives from it, so all ranks and all reports agree. Pixels equal to `ignore_index` never count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """`pred`: (B, H, W) class indices or (B, C, H, W) logits; `target`: (B, H, W)."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        keep = target != self.ignore_index
        t = target[keep].long()
        p = pred[keep].long()
        n = self.num_classes
        self.matrix += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, object]:
        return metrics_from_confusion(self.matrix, class_names)


def metrics_from_confusion(matrix: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, object]:
    """mIoU averages the classes present in truth or prediction (absent classes are NaN, not 0)."""
    m = matrix.double().cpu()
    tp = m.diag()
    support = m.sum(dim=1)
    predicted = m.sum(dim=0)
    union = support + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp(min=1),
                     torch.full_like(tp, float("nan")))
    total = m.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(m.shape[0])]
    valid = ~torch.isnan(iou)
    return {
        "miou": float(iou[valid].mean()) if valid.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_f1": float(f1[~torch.isnan(f1)].mean()) if (~torch.isnan(f1)).any() else float("nan"),
        "per_class_iou": {n: float(v) for n, v in zip(names, iou.tolist())},
        "per_class_f1": {n: float(v) for n, v in zip(names, f1.tolist())},
        "confusion_matrix": m.long().tolist(),
    }


def flatten_metrics(metrics: dict[str, object], prefix: str = "val/") -> dict[str, float]:
    """`{"miou": .., "per_class_iou": {"a": ..}}` -> `{"val/miou": .., "val/iou_a": ..}` (scalars only)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "per_class_iou":
            flat.update({f"{prefix}iou_{k}": v for k, v in value.items()})  # type: ignore[union-attr]
        elif key == "per_class_f1":
            flat.update({f"{prefix}f1_{k}": v for k, v in value.items()})  # type: ignore[union-attr]
        elif isinstance(value, int | float):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def validation_metric_names(class_names: Sequence[str]) -> list[str]:
    """Every key a validation logs (what `callbacks.monitor` may name), known from the classes before any data."""
    k = len(class_names)
    names = list(flatten_metrics(metrics_from_confusion(torch.eye(k, dtype=torch.int64), class_names)))
    return [*names, "val/loss"]


def monitor_mode(monitor: str) -> str:
    """The direction in which a validation metric improves: losses fall, scores rise."""
    return "min" if monitor.endswith("loss") else "max"
