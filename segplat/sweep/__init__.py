"""Optuna sweeps over the train task (see sweeper.py); registered with Hydra in hydra_plugins/segplat_sweeper."""
