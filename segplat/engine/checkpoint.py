"""Checkpoints: one file holding everything a run needs to continue or to predict.

Written atomically (temp file + rename): a kill during a save leaves the previous checkpoint
intact. Loaded with `torch.load(weights_only=True)`, so every value is a tensor or plain data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segplat.errors import CheckpointError
from segplat.utils.io import atomic_write

CHECKPOINT_FORMAT = 1
LAST = "last.ckpt"
BEST = "best.ckpt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    state = {"format": CHECKPOINT_FORMAT, **state}
    return atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} does not exist; give a run folder or a .ckpt file.") from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); it is not a "
                              "complete segplat checkpoint.") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a segplat checkpoint (format {CHECKPOINT_FORMAT}).")
    return state


def find_checkpoint(location: str | Path, prefer: str = LAST) -> Path:
    """A .ckpt file as given, or `checkpoints/<prefer>` (then any *.ckpt, newest) inside a run folder."""
    p = Path(location).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            if (folder / prefer).is_file():
                return folder / prefer
            found = sorted(folder.glob("*.ckpt"), key=lambda f: f.stat().st_mtime)
            if found:
                return found[-1]
        raise CheckpointError(f"no checkpoint in {p} (looked for checkpoints/{prefer} and *.ckpt); "
                              "give a run folder that has trained for at least one epoch.")
    raise CheckpointError(f"resume path {p} does not exist; give a run folder or a .ckpt file.")


def check_compatible(state: dict[str, Any], meta: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint written by another model, class table or modality set."""
    old = state.get("meta", {})
    for key, what in (("model_target", "model"), ("classes", "classes"), ("modalities", "modalities"),
                      ("fusion", "fusion")):
        if key in old and key in meta and old[key] != meta[key]:
            raise CheckpointError(f"checkpoint {source} was trained with {what} {old[key]} but this run builds "
                                  f"{meta[key]}; use a matching config or start a new run.")
