"""`trainer.compile` and `trainer.channels_last`: the two opt-in speed switches of the training step.

Both are checked when the trainer is built (before any data is read), applied to the model before Accelerate wraps
it, and the inputs follow the model's memory format:

    check_acceleration(compile, device, mixed_precision)                    # Trainer.__init__ (segplat.rules)
    model = prepare_model(model, compile=self.compile, channels_last=self.channels_last, device=acc.device)
    inputs = prepare_inputs(inputs, channels_last=self.channels_last)       # after the preprocessor

Why these choices:
- the model is compiled **in place** (`nn.Module.compile`), not wrapped (`torch.compile(model)` returns an
  `OptimizedModule` whose `state_dict` keys gain `_orig_mod.`, and Accelerate's `unwrap_model` keeps that
  wrapper by default): checkpoints of a compiled run load into an eager model and the other way round;
- channels_last converts the 4-D parameters and buffers (conv weights) once, and each batch's 4-D float
  inputs per step (a copy on the device), so the convolutions run NHWC end to end; 5-D time series keep
  their layout (the temporal encoders fold time into the batch themselves);
- a compile that cannot run here (no C++ compiler for inductor on CPU, no Triton on CUDA) is refused
  before any data is read, naming the key, instead of failing at the first step.
Equality with eager / contiguous is tested in tests/benchmarks/test_acceleration.py (tolerances there);
the speed is measured in benchmarks/step_time.py (CPU) and benchmarks/gpu/ (bf16 on one GPU).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def compile_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why torch.compile's default backend (inductor) cannot run on `device` here, or None when it can."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "inductor needs Triton on CUDA (pip install triton, the version your torch build names)"
        return None
    if dev.type == "cpu":
        candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in candidates):
            return "inductor needs a C++ compiler on CPU (install g++ or set CXX)"
        return None
    return None  # other backends (mps, xpu): let torch decide at the first step


def run_device(cpu: bool) -> str:
    """The device type a training run will use: CUDA when this machine has it, unless `trainer.cpu=true`."""
    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D parameters and buffers to channels_last, in place. (`model.to(memory_format=...)` refuses a model
    with any 5-D tensor, e.g. the Conv3d of unet3d, which keeps its layout here.)"""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.ndim == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def prepare_model(model: nn.Module, compile: bool = False, channels_last: bool = False,
                  device: torch.device | str | None = None,
                  compile_options: Mapping[str, Any] | None = None) -> nn.Module:
    """Apply `trainer.channels_last` and `trainer.compile` to `model` (in place; the same object is returned).

    `compile_options` go to `torch.compile` (e.g. `{"mode": "max-autotune"}`, or `{"backend": "eager"}` to trace
    without code generation). Call it before `accelerator.prepare`, after any module surgery (SyncBatchNorm)."""
    from segplat.rules import check_acceleration

    check_acceleration(compile, device, compile_options=compile_options)
    if channels_last:
        to_channels_last(model)
    if compile:
        model.compile(**dict(compile_options or {}))
    return model


def prepare_inputs(inputs: Mapping[str, torch.Tensor], channels_last: bool = False) -> dict[str, torch.Tensor]:
    """The model inputs in the model's memory format: 4-D floating tensors to channels_last when asked.

    Dates, time masks and 5-D series are passed through unchanged."""
    if not channels_last:
        return dict(inputs)
    return {k: (v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v)
            for k, v in inputs.items()}
