"""Loading pretrained weights from local files (runs never download), adapting the input channels."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segplat.errors import CheckpointError, ConfigError


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, .bin, .pt or .pth; unwraps {'state_dict'|'model': ...}."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"pretrained={path} is not a file; download the weights once and point the key at "
                          "the local file (runs never download).")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state: Any = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        from segplat.engine.checkpoint import refused_object

        raise CheckpointError(f"pretrained={file} {refused_object(err)}; weights files are never unpickled as code: "
                              "use a state dict of tensors (.safetensors, .pth, .bin).") from err
    except Exception as err:
        raise CheckpointError(f"{file} could not be read as a weights file ({err}); check the file.") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def adapt_input_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-layer conv weight (O, C, kh, kw) trained on C channels to `in_chans` channels.

    As timm does: 1 channel takes the sum; more channels repeat the pretrained ones cyclically and
    rescale by C / in_chans so activations keep their magnitude.
    """
    _out_c, c, _kh, _kw = weight.shape
    if in_chans == c:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c)
    w = weight.repeat(1, reps, 1, 1)[:, :in_chans]
    return w * (c / in_chans)


def load_adapted_state_dict(module: nn.Module, path: str | Path, in_chans: int,
                            state: dict[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Load weights non-strictly, adapting any conv weight whose input channels differ; report keys."""
    state = dict(state if state is not None else load_state_file(path))
    own = module.state_dict()
    adapted = []
    for key, value in list(state.items()):
        if key in own and value.ndim == 4 and own[key].ndim == 4 and value.shape[1] != own[key].shape[1] \
                and value.shape[0] == own[key].shape[0] and own[key].shape[1] == in_chans:
            state[key] = adapt_input_weight(value, in_chans)
            adapted.append(key)
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    for k in mismatched:
        state.pop(k)
    result = module.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys),
            "adapted": adapted, "shape_mismatch": mismatched}
