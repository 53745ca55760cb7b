"""segplat: multi-modal satellite image segmentation with Hydra, Accelerate and Optuna."""

__version__ = "0.1.0"

from segplat.utils.dist import register_resolvers as _register_resolvers

# conf/train.yaml's `${segplat.run_name:...}` must resolve wherever the config is composed (tasks, tests, sweeps)
_register_resolvers()
