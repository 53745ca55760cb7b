"""The Python API beside the CLI: build a preset model, or load a trained one, in a notebook.

    model = segplat.create_model("cmx", modalities={"rgb": 3, "nir": 1}, num_classes=4, backbone="mit_b0")
    loaded = segplat.load_model("logs/train/runs/exp1")   # .model, .preprocessor, .classes, .palette

`create_model` composes `conf/model/<name>.yaml` with `conf/fusion/<fusion>.yaml` exactly as
`python -m segplat.train model=<name> fusion=<fusion>` does, so a model built here and one built by
a run are the same. `load_model` is `segplat.inference.load_for_inference`: a checkpoint's stored
config is untrusted and only builders that configs on this machine name, with plain values, are built from it.
Both take `searchpath=["path/to/your/conf"]`, the API's spelling of the CLI's `hydra.searchpath=[file://...]`:
a user project's models (`create_model("tiny", ..., searchpath=["conf"])`) and checkpoints of runs that trained
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from segplat.errors import ConfigError
from segplat.messages import must_be, not_a_key, not_known


def create_model(name: str, modalities: Mapping[str, int], num_classes: int,
                 fusion: str | Mapping[str, Any] | None = None, searchpath: Sequence[str | Path] = (),
                 **overrides: Any) -> torch.nn.Module:
    """A model preset of `conf/model/` with random weights (or the local `pretrained` file an override names).

    `modalities` maps each input name to its channel count, in the model's input order. `fusion` is an option of
    `conf/fusion/` (`"early"`, `"mid"`, `"late"`, `"mid_attention"`) or a mapping merged into the preset's fusion
    (`{"stages": [2, 3]}`). `searchpath`: your own config folders (as `hydra.searchpath` on the command line), whose
    `model/` and `fusion/` presets are then chosen by name too. `overrides` are keys of the model config
    (`backbone="mit_b0"`, `encoder={"name": "resnet34"}`); an unknown key is refused with the nearest known one.
    """
    from hydra.errors import MissingConfigException

    from segplat.models.build import build_model
    from segplat.rules import check_model_fusion
    from segplat.schema import check_targets
    from segplat.utils.searchpath import searchpath_override
    from segplat.utils.task import compose_config, user_error_in

    choices = [*searchpath_override(searchpath), f"model={name}"] + ([f"fusion={fusion}"] if isinstance(fusion, str)
                                                                    else [])
    try:
        cfg = compose_config("train", choices)
    except MissingConfigException as err:
        group, _, value = str(getattr(err, "missing_cfg_file", "")).rpartition("/")
        options = [str(o) for o in getattr(err, "options", None) or []]
        raise ConfigError("create_model: " + not_known(group or "config", value, options)) from err
    model_cfg = cfg.model
    # a preset that takes the fusion group points at it (`fusion: ${fusion}`); others hold their own
    takes_group = "fusion" in model_cfg and OmegaConf.is_interpolation(model_cfg, "fusion")
    if isinstance(fusion, Mapping):
        _merge(cfg if takes_group else model_cfg, {"fusion": dict(fusion)}, "" if takes_group else "model")
    _merge(model_cfg, overrides, "model")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("create_model: " + must_be("num_classes", num_classes, "a positive integer"))
    modalities = {str(k): int(v) for k, v in dict(modalities).items()}
    with open_dict(cfg):
        cfg.dataset.modalities = list(modalities)
    try:
        check_targets(cfg.fusion, root="fusion")  # every key against its target's signature, as the tasks do
        check_targets(model_cfg, root="model")
        check_model_fusion(cfg)  # the same refusal as the CLI's, e.g. a fusion a preset with a fixed one would ignore
    except ConfigError as err:
        raise ConfigError(f"create_model: {err}") from None
    try:
        return build_model(model_cfg, modalities, num_classes)
    except Exception as err:  # Hydra wraps what a constructor raises; give the user's error itself
        raise (user_error_in(err) or err) from err


def _merge(node: DictConfig, values: Mapping[str, Any], where: str) -> None:
    """Merge plain values into a composed node (mounted at `where`), refusing keys it does not have."""
    for key, value in values.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in node:
            keys = [str(k) for k in node if not str(k).startswith("_")]
            raise ConfigError("create_model: " + not_a_key(full, where, keys))
        if isinstance(value, Mapping) and OmegaConf.is_dict(node[key]):
            _merge(node[key], value, full)
        else:
            with open_dict(node):
                node[key] = value


def load_model(run_or_checkpoint: str | Path, device: str | torch.device = "cpu",
               searchpath: Sequence[str | Path] = ()):
    """A trained model (eval mode) with its preprocessing and class table, from a run folder (its best.ckpt)
    or a .ckpt file: `.model`, `.preprocessor`, `.classes`, `.palette`, `.specs` (band names per modality).
    `searchpath`: your config folders, whose model and dataset targets may then be built from the checkpoint."""
    from segplat.inference import load_for_inference
    from segplat.utils.searchpath import entry_of, user_config_dirs

    entries = [entry_of(e) for e in ([searchpath] if isinstance(searchpath, str | Path) else searchpath)]
    user_config_dirs(entries, "searchpath")  # a folder that is not there is named as the API's argument
    return load_for_inference(run_or_checkpoint, device=device, searchpath=entries)
