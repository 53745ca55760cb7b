"""Config checks that need no data, and OmegaConf resolvers.

`check_values` runs first in every task (`task_wrapper`): required keys, the task's own keys (a `@section` per
task) and every `_target_` node against its target's signature (`segplat.schema`). `check_config` adds the rules
between keys (`segplat.rules`): impossible combinations (a fusion the model does not support, a patch larger than
the tiles) stop here, in one sentence naming the key, before data is read. The sweeper calls it on each
configuration a search space can draw, before the first trial.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf

from segplat.errors import ConfigError
from segplat.schema import Hint, section

# the config tree every task composes from (one owner: tasks, the API, checks and the checkpoint trust list)
CONF_DIR = Path(__file__).resolve().parent / "conf"


def register_resolvers() -> None:
    """segplat.run_name (one name on every rank) and segplat.rank_zero; also done on `import segplat`."""
    from segplat.utils.dist import register_resolvers as register_dist_resolvers

    register_dist_resolvers()


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


@section
class CheckpointTask:
    """The keys every task that reads a trained checkpoint shares (predict, evaluate)."""

    paths: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    task_name: str = ""
    run_name: str = ""
    ckpt: str = "???"
    device: Annotated[str, Hint("auto, cpu, cuda or cuda:N")] = "auto"
    progress: bool = True


def check_task_keys(cfg: DictConfig, task: type, closed: bool = True) -> None:
    """A task's own top-level keys (those without a `_target_`) against its `@section` (`PredictTask`, ...): each of
    its type, and, for a closed task, no other key. The summary composes the train config beside its own keys, so it
    checks only those (`closed=False`)."""
    from segplat.schema import check_section, check_value, plain_config

    tree = {k: v for k, v in plain_config(cfg).items() if k != "hydra"}
    if closed:
        check_section("", task, tree)
        return
    for name, tp in typing.get_type_hints(task, include_extras=True).items():
        if name in tree:
            check_value(name, tp, tree[name])


def check_values(cfg: DictConfig, task: type | None = None, closed: bool = True) -> None:
    """Every task, before anything else: required keys given, the task's own keys against its section (`task`, see
    `check_task_keys`), and every `_target_` node's keys against its target's signature (`check_targets`)."""
    plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)  # "???" marks a missing value
    for path, _, value in _leaves({k: v for k, v in plain.items() if k != "hydra"}, ""):
        if value == "???":
            hint = f" ({REQUIRED_HINTS[path]})" if path in REQUIRED_HINTS else ""
            raise ConfigError(f"{path} is required: add {path}=...{hint} to the command.")
    from segplat.schema import check_targets

    if task is not None:
        check_task_keys(cfg, task, closed)
    check_targets(cfg)


def check_config(cfg: DictConfig) -> None:
    """Refuse, in one sentence naming the key, what would fail or be ignored later; reads no data: every key's type
    (`check_values`), then the rules between keys (`segplat.rules.check_rules`)."""
    check_values(cfg)
    from segplat.rules import check_rules

    check_rules(cfg)
