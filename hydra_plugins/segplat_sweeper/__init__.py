"""Hydra imports every module under the `hydra_plugins` namespace; ours registers `hydra/sweeper: segplat_optuna`."""
