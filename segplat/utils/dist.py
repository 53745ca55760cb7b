"""Process-rank facts that hold before Accelerate is set up (Hydra start-up, logging), the early
process-group set-up, and the run name every rank agrees on.

Why the process group is initialised here and not by Accelerate: Hydra resolves `hydra.run.dir`
(which contains `run_name`) in every process before the task runs. A timestamp taken per process
differs between ranks and nodes, so under a launcher (torchrun, accelerate launch, srun + torchrun)
the `segplat.run_name` resolver joins the process group at once and takes rank 0's timestamp from
the rendezvous store. Accelerate later finds the group initialised and reuses it. Joining here also
lets us choose the backend (NCCL without GPUs falls back to gloo) and turn an unreachable
rendezvous into one sentence naming the address, after a short, configurable timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from datetime import datetime, timedelta
from typing import Any

from segplat.errors import ConfigError, SegplatError

RUN_NAME_KEY = "segplat/run_name"
_agreed_names: dict[str, str] = {}


def global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return global_rank() == 0


def adopt_slurm_env() -> None:
    """`srun python -m segplat.train` and hydra-submitit-launcher start one task per GPU with SLURM_*
    variables only; export the env:// ones (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) so that one
    code path serves every launcher. Only for a job step of several tasks, and never over variables a
    launcher already set (srun + torchrun)."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) <= 1:
        return
    if not env.get("MASTER_ADDR"):
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError) as err:
            raise ConfigError(f"cannot expand SLURM_STEP_NODELIST={nodes} with scontrol to find the rank-0 node; "
                              "export MASTER_ADDR in the sbatch script.") from err
        env["MASTER_ADDR"] = out[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000))
    env["RANK"] = env.get("SLURM_PROCID", "0")
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")


def is_distributed_launch() -> bool:
    """True under torchrun / accelerate launch / a multi-task srun step (env:// variables set)."""
    adopt_slurm_env()
    return world_size() > 1


def resolve_backend(backend: str | None = "auto", cpu: bool = False) -> str:
    """`auto`: NCCL when every rank has a CUDA device, else gloo. NCCL asked for without CUDA falls back
    to gloo with a warning, so one command works on a laptop and on a GPU node."""
    import torch

    backend = (backend or "auto").lower()  # typed on segplat.engine.Trainer: auto, nccl or gloo
    cuda = torch.cuda.is_available() and not cpu
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        if is_main_process():
            reason = "trainer.cpu=true" if cpu else "no CUDA device is visible"
            warnings.warn(f"trainer.backend=nccl needs CUDA devices but {reason}; falling back to gloo.",
                          UserWarning, stacklevel=2)
        return "gloo"
    return backend


def init_distributed(backend: str | None = "auto", cpu: bool = False, rendezvous_timeout: float = 120.0,
                     timeout: float = 1800.0) -> str | None:
    """Join the default process group from the env:// variables once; returns the backend, or None
    when this is a single-process run. Safe to call again (it returns the existing group's backend)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not is_distributed_launch():
        return None
    if dist.is_initialized():
        return str(dist.get_backend())
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ConfigError(f"WORLD_SIZE={world_size()} is set but MASTER_ADDR/MASTER_PORT are not; start the run "
                          "with torchrun or accelerate launch (see launch/README.md).")
    chosen = resolve_backend(backend, cpu)
    try:
        store, rank, world = next(iter(dist.rendezvous("env://", timeout=timedelta(seconds=float(rendezvous_timeout)))))
    except (RuntimeError, TimeoutError, OSError, ValueError) as err:
        role = "waited for the other ranks" if global_rank() == 0 else "could not reach the rendezvous"
        raise ConfigError(
            f"rank {global_rank()} of {world_size()} {role} at {addr}:{port} for {float(rendezvous_timeout):g} s "
            f"({type(err).__name__}); check that the rank-0 node is up and that MASTER_ADDR/--rdzv-endpoint name it "
            "and its port is open, or raise trainer.rendezvous_timeout."
        ) from err
    store.set_timeout(timedelta(seconds=float(timeout)))
    if chosen == "nccl":
        torch.cuda.set_device(local_rank() % max(1, torch.cuda.device_count()))
    dist.init_process_group(chosen, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=float(timeout)))
    return chosen


def _default_store():
    import torch.distributed.distributed_c10d as c10d

    return c10d._get_default_store()


def agreed_run_name(fmt: str = "%Y-%m-%d_%H-%M-%S", trainer_cfg: Any = None) -> str:
    """The run folder's name: a timestamp, the same on every rank of a launch.

    Single process: the local time. Under a launcher: rank 0's time, shared through the rendezvous
    store (no collective, so no device is needed yet). Keyed by the elastic restart count, so a restarted
    attempt never reads the previous attempt's name; to resume after a restart, fix `run_name`.
    """
    if fmt in _agreed_names:
        return _agreed_names[fmt]
    if not is_distributed_launch():
        name = datetime.now().strftime(fmt)
    else:
        get = (lambda k, d: trainer_cfg.get(k, d)) if trainer_cfg is not None else (lambda k, d: d)
        init_distributed(get("backend", "auto"), bool(get("cpu", False)), float(get("rendezvous_timeout", 120)),
                         float(get("dist_timeout", 1800)))
        store = _default_store()
        key = f"{RUN_NAME_KEY}/{fmt}/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if global_rank() == 0:
            name = datetime.now().strftime(fmt)
            store.set(key, name)
        else:
            name = store.get(key).decode()  # waits (up to trainer.dist_timeout) for rank 0 to set it
    _agreed_names[fmt] = name
    return name


def rank_zero_value(value: Any, other: Any = None) -> Any:
    """`value` on the main process, `other` on the others: Hydra's `.hydra/` folder and log file are
    written by rank 0 only (`hydra.output_subdir`, `hydra.job_logging.handlers.file.filename`)."""
    return value if is_main_process() else other


def _run_name_resolver(fmt: str = "%Y-%m-%d_%H-%M-%S", *, _root_: Any) -> str:
    """`${segplat.run_name:FORMAT}`. Cached in the config (like Hydra's `now`), so the folder Hydra made
    and the `run_name` the task resolves later are the same, also without a launcher."""
    from omegaconf import OmegaConf

    cache = OmegaConf.get_cache(_root_)
    hit = cache.get("segplat.run_name", {}).get(fmt)
    if hit is not None:
        return hit
    if is_distributed_launch():
        try:
            name = agreed_run_name(fmt, OmegaConf.select(_root_, "trainer", default=None))
        except SegplatError as err:  # raised while Hydra resolves hydra.run.dir, before the task wrapper
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
    else:
        name = datetime.now().strftime(fmt)
    cache.setdefault("segplat.run_name", {})[fmt] = name
    OmegaConf.set_cache(_root_, cache)
    return name


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("segplat.run_name"):
        OmegaConf.register_new_resolver("segplat.run_name", _run_name_resolver)
    if not OmegaConf.has_resolver("segplat.rank_zero"):
        OmegaConf.register_new_resolver("segplat.rank_zero", rank_zero_value)
