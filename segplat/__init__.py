"""segplat: multi-modal satellite image segmentation with Hydra, Accelerate and Optuna."""

__version__ = "0.1.0"
