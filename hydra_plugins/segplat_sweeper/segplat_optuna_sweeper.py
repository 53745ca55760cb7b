"""The Hydra side of the segplat Optuna sweeper: a `Sweeper` subclass and its ConfigStore node.

The work lives in `segplat.sweep.sweeper.OptunaSweeper`; this class only forwards to it, so Hydra's
plugin scan (which imports every module under hydra_plugins) stays cheap.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from segplat.sweep.config import SegplatOptunaSweeperConf


class SegplatOptunaSweeper(Sweeper):
    """Optuna 5 sweeper: trials as subprocesses, pruning, shared study storage, resume."""

    def __init__(self, **kwargs: Any) -> None:
        from segplat.sweep.sweeper import OptunaSweeper

        self.impl = OptunaSweeper(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.impl.sweep(arguments)


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="segplat_optuna",
    node=SegplatOptunaSweeperConf(_target_="hydra_plugins.segplat_sweeper.segplat_optuna_sweeper.SegplatOptunaSweeper"),
    provider="segplat",
)

# the hydra/sweeper/sampler group (segplat/conf/hydra/sweeper/sampler/) for apps whose config path is not segplat's
for _file in sorted(files("segplat").joinpath("conf", "hydra", "sweeper", "sampler").iterdir(), key=str):
    if _file.name.endswith(".yaml"):
        ConfigStore.instance().store(group="hydra/sweeper/sampler", name=_file.name[:-len(".yaml")],
                                     node=OmegaConf.create(_file.read_text()), provider="segplat")
