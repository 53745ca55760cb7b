"""Several trials at once on one node (`hydra.sweeper.n_jobs=K`): each trial slot gets its own devices and its
share of the CPU threads, through the environment its process starts with.

Devices are what the node shows the sweeper: `CUDA_VISIBLE_DEVICES` when it is set (in `hydra.sweeper.env` or
the sweeper's own environment, so a SLURM allocation's GPUs are respected), else every GPU torch counts. They are
dealt round-robin: slot i of K gets devices i, i+K, i+2K, ... so K <= devices gives every trial its own; more
slots than devices is refused unless `hydra.sweeper.share_devices=true`, which gives slot i device i mod D.
Every slot gets OMP/MKL/OpenBLAS threads = the sweeper's CPUs // K (a value the user put in `hydra.sweeper.env`
wins), so K trials do not each start one thread per CPU of the machine. One slot (K = 1) changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from segplat.errors import ConfigError

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
DEVICES_VAR = "CUDA_VISIBLE_DEVICES"


def visible_devices(env: Mapping[str, str]) -> list[str]:
    """The devices a trial may be given: `CUDA_VISIBLE_DEVICES` of the trials' env or of this process, else the
    GPUs torch counts (none on a CPU machine)."""
    listed = env.get(DEVICES_VAR, os.environ.get(DEVICES_VAR))
    if listed is not None:
        return [d.strip() for d in str(listed).split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def slot_envs(n_jobs: int, env: Mapping[str, str], share_devices: bool = False) -> list[dict[str, str]]:
    """The extra environment of each of `n_jobs` slots (empty for one slot)."""
    if n_jobs <= 1:
        return [{}]
    devices = visible_devices(env)
    if devices and n_jobs > len(devices) and not share_devices:
        raise ConfigError(f"hydra.sweeper.n_jobs={n_jobs} is more trials at once than the {len(devices)} device(s) "
                          f"this node shows ({DEVICES_VAR}={','.join(devices)}); lower hydra.sweeper.n_jobs, or let "
                          "trials share devices with hydra.sweeper.share_devices=true.")
    threads = str(max(1, cpu_count() // n_jobs))
    out = []
    for i in range(n_jobs):
        slot = {var: threads for var in THREAD_VARS if var not in env}
        if devices:
            mine = devices[i::n_jobs] if n_jobs <= len(devices) else [devices[i % len(devices)]]
            slot[DEVICES_VAR] = ",".join(mine)
        out.append(slot)
    return out
