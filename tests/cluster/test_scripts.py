"""launch/slurm.sbatch reads its process count and threads from the allocation, for any allocation: run with the
variables SLURM sets and stand-ins for srun/scontrol that record what they were asked (no SLURM needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
SBATCH = REPO / "launch" / "slurm.sbatch"


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\necho "OMP_NUM_THREADS=${OMP_NUM_THREADS} $*" > "$SRUN_LOG"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\necho node-b\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _launch(fake_bin: Path, tmp_path: Path, **slurm: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "srun.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC", "RUN_ID"))}
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", SRUN_LOG=str(log), SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", **slurm)
    res = subprocess.run(["bash", str(SBATCH), "trainer.max_epochs=3"], env=env, capture_output=True, text=True,
                         timeout=30)
    return res, log.read_text() if log.exists() else ""


@pytest.mark.parametrize(("allocation", "nproc", "threads"), [
    ({"SLURM_CPUS_ON_NODE": "8"}, 1, 8),  # a CPU partition: one process with every CPU
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_CPUS_ON_NODE": "4"}, 1, 4),  # --gpus-per-node=0: no division by zero
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "32"}, 4, 8),  # one process per GPU
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "2"}, 4, 1),  # fewer CPUs than GPUs: still one thread
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}, 2, 1),  # CPU processes asked with --ntasks-per-node
    ({"SLURM_CPUS_ON_NODE": "6(x2)", "NPROC": "3"}, 3, 2),  # NPROC wins; "6(x2)" is how SLURM writes per-node CPUs
])
def test_processes_and_threads_come_from_the_allocation(fake_bin: Path, tmp_path: Path, allocation: dict,
                                                        nproc: int, threads: int) -> None:
    res, srun = _launch(fake_bin, tmp_path, **allocation)
    assert res.returncode == 0, res.stderr
    assert srun.startswith(f"OMP_NUM_THREADS={threads} "), srun
    assert f"--nproc-per-node {nproc} " in srun and "--nnodes 2 " in srun
    assert "--ntasks=2 --ntasks-per-node=1" in srun and "--rdzv-endpoint node-a:" in srun
    assert srun.rstrip().endswith("run_name=slurm-77 trainer.resume=auto trainer.max_epochs=3")


def test_a_bad_process_count_is_refused_and_run_id_names_the_run(fake_bin: Path, tmp_path: Path) -> None:
    res, srun = _launch(fake_bin, tmp_path, NPROC="0", SLURM_CPUS_ON_NODE="2")
    assert res.returncode == 2 and srun == ""
    assert res.stderr.strip() == "error: NPROC=0 must be a positive integer (processes per node)."
    res, srun = _launch(fake_bin, tmp_path, RUN_ID="exp1", SLURM_CPUS_ON_NODE="2")
    assert res.returncode == 0 and "run_name=exp1 trainer.resume=auto" in srun
