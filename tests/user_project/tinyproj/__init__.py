"""A user's own package, as it would live in their project: a model, a layout, a loss term, a tracker and a fusion
module that segplat knows only through the configs in ../conf (joined with `hydra.searchpath`). segplat never
imports it; tests put this folder on PYTHONPATH."""
