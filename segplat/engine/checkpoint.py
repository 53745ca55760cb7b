"""Checkpoints: one file holding everything a run needs to continue or to predict.

Written atomically (temp file + rename): a kill during a save leaves the previous checkpoint
intact. Loaded with `torch.load(weights_only=True)`, so every value is a tensor or plain data.

A checkpoint is untrusted input: its stored config is YAML that prediction and evaluation build
models and datasets from. `inference_config` lets through only what segplat's own model, fusion
and dataset configs name as `_target_` (exact strings, checked before anything is imported), with
plain values as arguments; anything else refuses the checkpoint in one sentence naming the key.
"""

from __future__ import annotations

import functools
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from segplat.errors import CheckpointError
from segplat.utils.io import atomic_write

log = logging.getLogger("segplat")

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
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path} {refused_object(err)}; segplat never unpickles code, so it was not "
                              "loaded: use a checkpoint written by segplat.") from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); it is not a "
                              "complete segplat checkpoint.") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a segplat checkpoint (format {CHECKPOINT_FORMAT}).")
    return state


def refused_object(err: pickle.UnpicklingError) -> str:
    """What `torch.load(weights_only=True)` refused, in a few words (its own message is a page long)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    return f"holds a Python object{what} that is not a tensor or plain data"


def find_checkpoint(location: str | Path, prefer: str = LAST, key: str = "ckpt") -> Path:
    """A .ckpt file as given, or `checkpoints/<prefer>` (then any *.ckpt, newest) inside a run folder.

    `key` is the config key the location came from (`ckpt`, `trainer.resume`), named in the errors.
    """
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
        raise CheckpointError(f"{key}={p}: no checkpoint in that folder (looked for checkpoints/{prefer} and *.ckpt); "
                              "give a run folder that has trained for at least one epoch.")
    raise CheckpointError(f"{key}={p} does not exist; give a run folder or a .ckpt file.")


def check_compatible(state: dict[str, Any], meta: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint written by another model, class table or modality set."""
    old = state.get("meta", {})
    for key, what in (("model_target", "model"), ("classes", "classes"), ("modalities", "modalities"),
                      ("fusion", "fusion")):
        if key in old and key in meta and old[key] != meta[key]:
            raise CheckpointError(f"checkpoint {source} was trained with {what} {old[key]} but this run builds "
                                  f"{meta[key]}; use a matching config or start a new run.")


# -- the stored config of an untrusted checkpoint ----------------------------------------------------
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the config groups whose `_target_`s a checkpoint may name: what prediction and evaluation build
TRUSTED_GROUPS = ("model", "fusion", "dataset")
# builders a model config may name beyond the shipped presets (MiT sizes for a stream's encoder)
EXTRA_TRUSTED_TARGETS = frozenset(f"segplat.models.encoders.mit.mit_b{i}" for i in range(6))
# Hydra's instantiate keys that only steer how a trusted target is called
_BUILD_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# dataset keys that say where to read and write on the machine that trained; never taken from a checkpoint
DATASET_LOCATION_KEYS = ("store_dir", "store_path", "store_uri", "cache_dir")


def _targets_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                yield value
            else:
                yield from _targets_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets_in(value)


@functools.cache
def trusted_targets() -> frozenset[str]:
    """Every `_target_` named in segplat's own model, fusion and dataset configs (conf/), plus MiT sizes.

    Derived from the shipped configs so that a new model or fusion type (its module + one config file)
    is trusted without a second list to keep in step.
    """
    found = set(EXTRA_TRUSTED_TARGETS)
    for group in TRUSTED_GROUPS:
        for file in sorted((CONF_DIR / group).rglob("*.yaml")):
            found.update(_targets_in(yaml.safe_load(file.read_text())))
    return frozenset(found)


def check_buildable(node: Any, where: str, source: str | Path, trusted: frozenset[str] | None = None) -> None:
    """Refuse any `_target_` outside segplat's builders, any other Hydra key, and any interpolation, at any depth."""
    trusted = trusted_targets() if trusted is None else trusted

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {source} {what}; refusing to build from it (only segplat's own model, "
                               "fusion and dataset builders may be named in a checkpoint).")

    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            if not isinstance(key, str):
                raise refuse(f"has a non-text key {key!r} under {where}")
            if key == "_target_":
                if not isinstance(value, str) or value not in trusted:
                    raise refuse(f"names {path}={value!r}, which is not a segplat builder")
            elif key.startswith("_") and key.endswith("_") and key not in _BUILD_KEYS:
                raise refuse(f"sets the Hydra key {path}")
            else:
                check_buildable(value, path, source, trusted)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_buildable(value, f"{where}[{i}]", source, trusted)
    elif isinstance(node, str):
        if "${" in node:
            raise refuse(f"holds an interpolation at {where} ({node!r})")
    elif node is not None and not isinstance(node, bool | int | float):
        raise refuse(f"holds a {type(node).__name__} at {where}")


def _drop_pretrained(node: Any, where: str) -> None:
    """The checkpoint's weights replace any pretrained file: never open a path the checkpoint names."""
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == "pretrained" or key.endswith("_pretrained")) and isinstance(value, str):
                log.info("%s.%s=%s is not loaded: the checkpoint's weights replace it", where, key, value)
                node[key] = None
            else:
                _drop_pretrained(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _drop_pretrained(value, f"{where}[{i}]")


def inference_config(state: dict[str, Any], source: str | Path) -> DictConfig:
    """The `model` and `dataset` parts of a checkpoint's stored config, checked so that building them runs
    only segplat's own builders with plain values; pretrained paths and store locations are dropped."""
    text = state.get("config")
    if not isinstance(text, str):
        raise CheckpointError(f"checkpoint {source} carries no config (written by an older segplat); predict from a "
                              "run trained with this version.")
    try:
        stored = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CheckpointError(f"checkpoint {source} has a config that is not valid YAML ({err}).") from err
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise CheckpointError(f"checkpoint {source} has no model config; use a checkpoint written by segplat.")
    parts = {"model": stored["model"], "dataset": stored.get("dataset") or {}}
    for name, node in parts.items():
        check_buildable(node, name, source)
    _drop_pretrained(parts["model"], "model")
    for key in DATASET_LOCATION_KEYS:
        parts["dataset"].pop(key, None)
    return OmegaConf.create(parts)


def run_config_target(run_dir: Path) -> str | None:
    """`model._target_` of a run folder's config.yaml (None when the folder has none)."""
    file = run_dir / "config.yaml"
    if not file.is_file():
        return None
    try:
        cfg = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model.get("_target_") if isinstance(model, dict) else None


def check_belongs_to_run(location: str | Path, checkpoint: Path, config: DictConfig) -> None:
    """A run folder's checkpoint must have been written by that run (same model), not copied in from another."""
    run_dir = Path(location).expanduser()
    if not run_dir.is_dir():
        return
    expected = run_config_target(run_dir)
    found = OmegaConf.select(config, "model._target_")
    if expected is not None and expected != found:
        raise CheckpointError(f"{checkpoint} holds a {found} model but the run folder's config.yaml trains {expected}; "
                              "it belongs to another run: give that run's folder or the .ckpt file itself.")
