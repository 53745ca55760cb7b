"""The one batch forward that validation, evaluation and sliding-window prediction share.

Here, not in `segplat.inference`, so that the trainer can use it without importing the predictor (which imports
the checkpoint loader, which imports the engine package)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from torch.nn import functional as F

from segplat.data.preprocess import Preprocessor

# a test-time augmentation view: (scale, horizontal flip, vertical flip)
TTAView = tuple[float, bool, bool]


def forward_batch(model: torch.nn.Module, preprocessor: Preprocessor, batch: Mapping[str, torch.Tensor],
                  device: str | torch.device, autocast: Callable[[], AbstractContextManager] | None = None,
                  views: Sequence[TTAView] | None = None) -> torch.Tensor:
    """Logits (B, K, H, W) in float32 of a batch of native-dtype arrays, the model in whatever mode the caller set.

    The forward that validation (`Trainer.evaluate`), `segplat.evaluate` and the sliding-window predictor share, so
    what is measured is what is predicted: the batch's model inputs (modalities and the dates/time masks of
    temporal streams; labels and other keys are left alone) go to `device`, are preprocessed there (CuPy on
    CUDA, NumPy on CPU) and run without gradients under `autocast()` (default: bf16 on CUDA, off on CPU; the
    trainer passes `accelerator.autocast`). `views` (test-time augmentation) average the logits of each view,
    mapped back onto the input grid, as ttach does.
    """
    device = torch.device(device)
    wanted = {k for m in preprocessor.modalities for k in (m, f"{m}_dates", f"{m}_time_mask")}
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in wanted}
    if autocast is None:
        def autocast() -> AbstractContextManager:
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    views = list(views) if views else [(1.0, False, False)]
    with torch.no_grad():
        inputs = preprocessor(moved, train=False)
        size = inputs[preprocessor.modalities[0]].shape[-2:]
        total = None
        for scale, hflip, vflip in views:
            x = {k: _view(v, scale, hflip, vflip) if k in preprocessor.modalities else v for k, v in inputs.items()}
            with autocast():
                logits = model(x)["out"].float()
            if hflip:
                logits = logits.flip(-1)
            if vflip:
                logits = logits.flip(-2)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
    return total if len(views) == 1 else total / len(views)


def _view(x: torch.Tensor, scale: float, hflip: bool, vflip: bool) -> torch.Tensor:
    if scale != 1.0:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    return x
