"""Process-rank facts that hold before Accelerate is set up (Hydra start-up, logging)."""

from __future__ import annotations

import os


def global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return global_rank() == 0
