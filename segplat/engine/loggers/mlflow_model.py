"""A trained run as an MLflow model: the model with its preprocessing, an input example and a signature built from
the dataset's modalities, logged with MLflow's PyTorch flavour (and registered under a name when asked).

`mlflow.pytorch.load_model(uri)` gives back a `ServedModel`: call it with a mapping of each modality to its
native-dtype array batch, `(B, C, H, W)` (`(B, T, C, H, W)` plus `<m>_dates` / `<m>_time_mask` for a temporal
stream), and it returns the logits `(B, K, H, W)` that `segplat.load_model` and `segplat.predict` compute for the
same batch: its forward is theirs (`segplat.engine.forward.forward_batch`). MLflow's generic pyfunc wrapper of
PyTorch models takes one array only, so serving goes through `mlflow.pytorch.load_model`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("segplat")
# the example's label-grid size: small (MLflow stores it as JSON) but a whole window of every modality
EXAMPLE_SIZE = 64


class ServedModel(nn.Module):
    """The model and its preprocessor as one module: native arrays in, logits out."""

    def __init__(self, model: nn.Module, preprocessor: Any, classes: list[str]) -> None:
        super().__init__()
        self.model = model
        self.preprocessor = preprocessor
        self.classes = list(classes)

    def forward(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        from segplat.engine.forward import forward_batch

        device = next(self.model.parameters()).device
        batch = {k: torch.as_tensor(v) for k, v in inputs.items()}
        return forward_batch(self.model, self.preprocessor, batch, device)


def example_size(loaded: Any) -> int:
    """A label-grid size every modality maps to whole pixels at, and the model takes (the training patch or less)."""
    from segplat.data.windows import grid_alignment

    align = grid_alignment(spec.scale for spec in loaded.specs.values())
    size = min(int(loaded.patch_size), EXAMPLE_SIZE)
    return size if size % align == 0 and int(loaded.patch_size) % size == 0 else int(loaded.patch_size)


def input_example(loaded: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of one window in each modality's stored dtype and band count (random values in its range)."""
    rng = np.random.default_rng(seed)
    size = example_size(loaded)
    out: dict[str, np.ndarray] = {}
    for name, spec in loaded.specs.items():
        side = max(1, round(size * spec.scale))
        steps = int(spec.max_time or 2) if spec.temporal else 0
        shape = (1, *((steps,) if steps else ()), len(spec.bands), side, side)
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "ui":
            high = min(np.iinfo(dtype).max, 255 if dtype.itemsize == 1 else 10000)
            out[name] = rng.integers(0, high, size=shape, endpoint=True).astype(dtype)
        else:
            out[name] = rng.random(shape).astype(dtype)
        if steps:
            out[f"{name}_dates"] = np.arange(steps, dtype=np.int32)[None] * 10
            out[f"{name}_time_mask"] = np.ones((1, steps), dtype=bool)
    return out


def signature(loaded: Any, example: Mapping[str, np.ndarray]) -> Any:
    """Named tensors, one per input (batch and spatial sizes free), and the logits (one channel per class)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = []
    for name, array in example.items():
        shape = list(array.shape)
        shape[0] = -1
        if array.ndim >= 4:
            shape[-1] = shape[-2] = -1
        inputs.append(TensorSpec(array.dtype, tuple(shape), name))
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, len(loaded.classes), -1, -1), "logits")])
    return ModelSignature(inputs=Schema(inputs), outputs=outputs)


@contextlib.contextmanager
def _quiet_serving_check() -> Iterator[None]:
    """MLflow checks an input example through its pyfunc wrapper, which takes one array, never a mapping: the
    warning it logs about a mapping example says nothing about this model."""
    logger = logging.getLogger("mlflow.models.model")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def log_model(tracking_uri: str, run_id: str, checkpoint: str | Path, register_as: str | None = None) -> str:
    """Log the checkpoint's model into the MLflow run `run_id` (artifact name `model`); returns its model URI."""
    import mlflow
    import mlflow.pytorch

    from segplat.inference import load_for_inference

    loaded = load_for_inference(checkpoint)
    served = ServedModel(loaded.model, loaded.preprocessor, loaded.classes).eval()
    example = input_example(loaded)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # MLflow's fluent API; unset, it writes a store in the working folder
    try:
        with mlflow.start_run(run_id=run_id), _quiet_serving_check():
            info = mlflow.pytorch.log_model(served, name="model", signature=signature(loaded, example),
                                            input_example=example, registered_model_name=register_as,
                                            serialization_format="pickle", await_registration_for=60)
    finally:
        mlflow.set_tracking_uri(previous)
    log.info("MLflow model %s logged from %s%s", info.model_uri, checkpoint,
             f" and registered as {register_as}" if register_as else "")
    return info.model_uri
