"""The training engine on Accelerate: trainer, callbacks, checkpoints and loggers."""

from segplat.engine.trainer import Trainer

__all__ = ["Trainer"]
