"""Start `segplat.train` under torchrun (or plainly) in subprocesses, on CPU with gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TINY

# TINY with a BatchNorm-free model (see tiny_model.py) in place of the U-Net preset (whose keys it does not take),
# full precision on CPU, no progress bars
BASE = [*TINY, "model._target_=tests.distributed.tiny_model.GroupNormNet", "~model.encoder", "~model.decoder",
        "~model.head_dropout", "~model.fusion", "trainer.mixed_precision=no", "trainer.gradient_clip_val=1.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(log_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SEGPLAT_LOG_DIR=str(log_dir), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun_cmd(overrides: list[str], nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
                 endpoint: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")  # c10d on a free local port
    else:
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}", "--rdzv-id=segplat-test", "--rdzv-conf=join_timeout=60"]
    return [*cmd, "-m", "segplat.train", *overrides]


def plain_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "segplat.train", *overrides]


def run(cmd: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
