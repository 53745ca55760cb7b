"""segplat: multi-modal satellite image segmentation with Hydra, Accelerate and Optuna.

Beside the CLI (`python -m segplat.train` ...), a Python API for notebooks:
`segplat.create_model(name, modalities, num_classes, **overrides)` and `segplat.load_model(run_or_ckpt)`.
"""

__version__ = "0.1.0"

from segplat.utils.dist import register_resolvers as _register_resolvers

# conf/train.yaml's `${segplat.run_name:...}` must resolve wherever the config is composed (tasks, tests, sweeps)
_register_resolvers()


def __getattr__(name: str):
    """`segplat.create_model` / `segplat.load_model` import torch and Hydra only when first used."""
    if name in ("create_model", "load_model"):
        from segplat import api

        return getattr(api, name)
    raise AttributeError(f"module 'segplat' has no attribute {name!r}")


__all__ = ["create_model", "load_model"]
