"""The Hydra side of the segplat Optuna sweeper: a `Sweeper` subclass and its ConfigStore node.

The work lives in `segplat.sweep.sweeper.OptunaSweeper`; this class only forwards to it, so Hydra's
plugin scan (which imports every module under hydra_plugins) stays cheap. A value the sweeper refuses
(`hydra.sweeper.n_jobs=0`, a key added with `+hydra.sweeper.KEY=`) is reported when the sweep starts, as
the project's one `error:` sentence with exit status 2, not inside Hydra's "Error in call to target" text.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from segplat.sweep.config import SegplatOptunaSweeperConf


class SegplatOptunaSweeper(Sweeper):
    """Optuna 5 sweeper: trials as subprocesses or cluster jobs, pruning, shared study storage, resume."""

    def __init__(self, **kwargs: Any) -> None:
        from segplat.errors import ConfigError, SegplatError
        from segplat.messages import not_a_key
        from segplat.sweep.sweeper import OptunaSweeper

        self.impl: OptunaSweeper | None = None
        self.error: SegplatError | None = None
        params = inspect.signature(OptunaSweeper.__init__).parameters
        known = {name for name, p in params.items() if name != "self" and p.kind != p.VAR_KEYWORD}
        open_ = any(p.kind == p.VAR_KEYWORD for p in params.values())
        unknown = [] if open_ else sorted(set(kwargs) - known)
        if unknown:
            self.error = ConfigError(not_a_key(f"hydra.sweeper.{unknown[0]}", "hydra.sweeper", known))
            return
        try:
            self.impl = OptunaSweeper(**kwargs)
        except SegplatError as err:
            self.error = err

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        if self.impl is not None:
            self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        if self.impl is None:
            print(f"error: {self.error}", file=sys.stderr, flush=True)
            sys.exit(2)
        return self.impl.sweep(arguments)


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="segplat_optuna",
    node=SegplatOptunaSweeperConf(_target_="hydra_plugins.segplat_sweeper.segplat_optuna_sweeper.SegplatOptunaSweeper"),
    provider="segplat",
)
