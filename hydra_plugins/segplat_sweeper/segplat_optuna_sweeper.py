"""The Hydra side of the segplat Optuna sweeper: a `Sweeper` subclass and its ConfigStore node.

The work lives in `segplat.sweep.sweeper.OptunaSweeper`; this class only forwards to it, so Hydra's
plugin scan (which imports every module under hydra_plugins) stays cheap. A value the sweeper refuses
(`hydra.sweeper.n_jobs=0`, a key added with `+hydra.sweeper.KEY=`) is reported when the sweep starts, as
the project's one `error:` sentence with exit status 2, not inside Hydra's "Error in call to target" text.
"""

from __future__ import annotations

import inspect
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

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


class SegplatSamplerGroup(SearchPathPlugin):
    """The hydra/sweeper/sampler group (segplat/conf/hydra/sweeper/sampler/) for an app whose config path is not
    segplat's, registered when Hydra builds that app's search path. segplat's own tasks find the files in their
    config path; registering them there too would make Hydra match each file against a same-named schema."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        conf = Path(str(files("segplat").joinpath("conf"))).resolve()
        for element in search_path.get_path():
            path = str(element.path)
            if path.startswith("pkg://segplat.conf") or (not path.startswith("pkg://") and _resolved(path) == conf):
                return
        store = ConfigStore.instance()
        for file in sorted(conf.joinpath("hydra", "sweeper", "sampler").glob("*.yaml")):
            store.store(group="hydra/sweeper/sampler", name=file.stem, node=OmegaConf.load(file), provider="segplat")


def _resolved(path: str) -> Path | None:
    try:
        return Path(path.removeprefix("file://")).resolve()
    except (OSError, ValueError):
        return None
