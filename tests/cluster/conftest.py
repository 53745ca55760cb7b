"""The session's one-node SLURM (tests/cluster/slurm.py): started once for every `slurm` test, stopped by PID at the
end; the tests skip, saying why, where its daemons cannot start (not installed, not root)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.slurm import Slurm, missing
from tests.distributed.launch_utils import env_for


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    why = missing()
    if why is not None:
        pytest.skip(f"no SLURM here: {why}")
    # a short path of its own: the munge socket's path must fit a unix socket name, and jobs (root) read it
    root = Path(tempfile.mkdtemp(prefix="segplat-slurm-"))
    cluster = Slurm(root)
    try:
        cluster.start()
    except Exception as err:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"SLURM's daemons could not start here: {str(err)[:2000]}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def job_env(slurm: Slurm, log_dir: Path, **extra: str) -> dict[str, str]:
    """What a job needs: this interpreter first on PATH, the repository importable, runs under `log_dir`."""
    env = env_for(log_dir, SLURM_CONF=str(slurm.conf), **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("OMP_NUM_THREADS", None)  # the scripts and presets set it from the allocation
    return env
