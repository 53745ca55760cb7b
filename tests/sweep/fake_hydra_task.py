"""A minimal Hydra app, so runner tests read the error output of Hydra itself (not a copy of it).

`python -m tests.sweep.fake_hydra_task +mode=raise` raises inside the job; `no.such.key=1` fails to compose.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    if cfg.get("mode") == "raise":
        raise ValueError("the real cause\nwith a second line")


if __name__ == "__main__":
    main()
