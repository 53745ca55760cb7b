"""Config checks that need no data, and OmegaConf resolvers.

`check_config` runs first in every task: impossible combinations (a fusion the model does not
support, non-positive sizes) stop here, in one sentence naming the key, before data is read. The
sweeper calls it on each configuration a search space can draw, before the first trial.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from segplat.errors import ConfigError
from segplat.utils.plain import to_plain

if TYPE_CHECKING:
    from segplat.models.fusion.spec import FusionSpec

# the config tree every task composes from (one owner: tasks, the API, checks and the checkpoint trust list)
CONF_DIR = Path(__file__).resolve().parent / "conf"


def register_resolvers() -> None:
    """segplat.run_name (one name on every rank) and segplat.rank_zero; also done on `import segplat`."""
    from segplat.utils.dist import register_resolvers as register_dist_resolvers

    register_dist_resolvers()


@functools.cache
def flag_names() -> frozenset[str]:
    """Key names that are true/false wherever the shipped configs set them (overwrite, force, flips, progress, ...).

    A word given for one (`trainer.overwrite=no`) reaches Python as the text "no", which is true: the check
    below refuses it instead of deleting a run folder."""
    import yaml

    flags: set[str] = set()
    other: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and not key.startswith("_"):
                    if isinstance(value, bool):
                        flags.add(key)
                    elif value is not None and not isinstance(value, dict | list) and not str(value).startswith("${"):
                        other.add(key)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for file in CONF_DIR.rglob("*.yaml"):
        walk(yaml.safe_load(file.read_text()))
    return frozenset(flags - other)


def _leaves(node: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(value, dict | list):
                yield from _leaves(value, path)
            else:
                yield path, str(key), value
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{where}[{i}]")


REQUIRED_HINTS = {"ckpt": "a training run folder or a .ckpt file",
                  "input": "a raster, a folder of rasters, a list file, or a dataset root with split="}


def check_values(cfg: DictConfig) -> None:
    """Every task, before anything else: required keys given, true/false keys given true or false, and every
    `_target_` node's keys against its target's signature (`segplat.schema.check_targets`)."""
    names = flag_names()
    plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)  # "???" marks a missing value
    for path, key, value in _leaves({k: v for k, v in plain.items() if k != "hydra"}, ""):
        if value == "???":
            hint = f" ({REQUIRED_HINTS[path]})" if path in REQUIRED_HINTS else ""
            raise ConfigError(f"{path} is required: add {path}=...{hint} to the command.")
        if key in names and value is not None and not isinstance(value, bool):
            if isinstance(value, str) and value.startswith("${"):
                continue  # an interpolation: its target is checked where it is set
            raise ConfigError(f"{path}={value} must be true or false.")
    from segplat.schema import check_targets

    check_targets(cfg)


def check_config(cfg: DictConfig) -> None:
    """Refuse, in one sentence naming the key, what would fail or be ignored later; reads no data."""
    check_values(cfg)
    for key in ("dataset.batch_size", "dataset.patch_size", "trainer.max_epochs"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{key}={value} must be a positive integer.")
    for key in ("optimizer.lr", "optimizer.encoder_lr", "optimizer.fusion_lr", "optimizer.decoder_lr"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, int | float) and value > 0):
            raise ConfigError(f"{key}={value} must be a positive number.")
    if cfg.callbacks.get("mode") not in ("max", "min"):
        raise ConfigError(f"callbacks.mode={cfg.callbacks.get('mode')} must be max or min.")
    if "trainer" in cfg:
        from segplat.engine.acceleration import check_acceleration, run_device

        check_acceleration(cfg.trainer.get("compile", False), cfg.trainer.get("channels_last", False),
                           run_device(bool(cfg.trainer.get("cpu", False))))
    check_model_fusion(cfg)


def check_model_fusion(cfg: DictConfig) -> FusionSpec | None:
    """The model x fusion x modalities check of `check_config`: the fusion spec the model will build, or a refusal.

    The `fusion` group must reach the model (presets take `fusion: ${fusion}`), the model must accept its
    level, type and stages (the stage count comes from the model config, e.g. its encoder), and the
    dataset must give the number of modalities the fusion needs.
    """
    from segplat.models.build import fusion_check, model_class
    from segplat.models.fusion.spec import FusionSpec, resolve_fusion

    target = OmegaConf.select(cfg, "model._target_")
    if target is None:
        raise ConfigError("model._target_ is missing; choose a model preset such as model=unet.")
    model_cls = model_class(target)  # importable, and the class-level part of the model contract
    group = cfg.get("fusion")
    given = cfg.model.get("fusion") if "fusion" in cfg.model else None
    if group is not None and "fusion" not in cfg.model and resolve_fusion(group) != FusionSpec():
        raise ConfigError(f"model {target} takes no model.fusion, so fusion={to_plain(group)} would be ignored; use "
                          "fusion=early or give the preset `fusion: ${fusion}`.")
    if group is not None and given is not None and to_plain(given) != to_plain(group):
        raise ConfigError(f"model.fusion={to_plain(given)} differs from the fusion group ({to_plain(group)}), "
                          "which the preset would ignore; presets take `fusion: ${fusion}` and fusion is chosen with "
                          "fusion=...")
    if given is None:
        return None
    check = fusion_check(model_cls)
    spec = resolve_fusion(given)
    modalities = OmegaConf.select(cfg, "dataset.modalities")
    count = getattr(model_cls, "fusion_stage_count", None)
    num_stages = count(cfg.model) if count is not None and spec is not None and spec.stages is not None else None
    return check(spec, len(modalities) if modalities else None, num_stages)


