"""Multi-process training on CPU (gloo) under torchrun: equivalence, multi-node, kill + resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from segplat.config import check_config
from segplat.engine.trainer import resolve_sync_batchnorm
from segplat.errors import ConfigError
from tests.conftest import REPO, compose_train
from tests.distributed.launch_utils import BASE, env_for, free_port, metrics, plain_cmd, run, summary, torchrun_cmd

pytestmark = pytest.mark.distributed


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """2 x b on gloo == 1 x 2b: same sample order per step, averaged gradients, exact summed metrics.
    Accumulation over 2 micro-batches exercises no_sync; 27 validation patches (odd) leave one rank a
    sample short, so a padded duplicate or a per-batch loss mean would show up as a difference."""
    common = [*BASE, "dataset.patch_size=24", "dataset.layout.num_val=3", "trainer.max_epochs=2",
              "trainer.accumulate_grad_batches=2", "dataset.batch_size=4", "dataset.val_batch_size=4"]
    env = env_for(tmp_path / "logs")
    one = run(plain_cmd([*common, "run_name=one"]), env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun_cmd([*common, "run_name=two"], nproc=2), env)
    assert two.returncode == 0, two.stderr[-3000:]
    runs = tmp_path / "logs" / "train" / "runs"
    a, b = summary(runs / "one"), summary(runs / "two")
    assert a["global_step"] == b["global_step"] == 2 * 2  # 16 patches / (4 x 2 accumulated) per epoch, 2 epochs
    wa, wb = _weights(runs / "one"), _weights(runs / "two")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=f"weights differ at {key}")
    cm_a, cm_b = torch.tensor(a["confusion_matrix"]), torch.tensor(b["confusion_matrix"])
    # every validation pixel counted exactly once: 3 tiles of 64 x 64 (the 27 windows of 24 overlap; it counted
    # 27 x 24 x 24 = 15552, the overlaps twice)
    assert int(cm_a.sum()) == int(cm_b.sum()) == 3 * 64 * 64
    assert int((cm_a - cm_b).abs().sum()) <= 0.001 * 3 * 64 * 64  # argmax ties may flip on float noise only
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert b["miou"] == pytest.approx(a["miou"], abs=1e-3)
    la, lb = metrics(runs / "one"), metrics(runs / "two")
    assert [r["train/loss"] for r in lb] == pytest.approx([r["train/loss"] for r in la], rel=1e-4)


@pytest.mark.slow
def test_two_nodes_on_localhost_share_one_run_directory(tmp_path: Path) -> None:
    """Node 0 and node 1 (one process each, c10d rendezvous) with no run_name given: one folder, one
    summary.json, .hydra written once; NCCL asked for without GPUs falls back to gloo with a warning."""
    endpoint = f"127.0.0.1:{free_port()}"
    overrides = [*BASE, "trainer.max_epochs=1", "trainer.backend=nccl"]
    env = env_for(tmp_path / "logs")
    procs = [subprocess.Popen(torchrun_cmd(overrides, nproc=1, nnodes=2, node_rank=r, endpoint=endpoint), env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run_dir = runs[0]
    assert len(list((tmp_path / "logs").rglob("summary.json"))) == 1
    assert summary(run_dir)["status"] == "completed"
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert f"run_name: {run_dir.name}" in (run_dir / "config.yaml").read_text()
    assert "falling back to gloo" in "".join(err for _, err in outs)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared: "
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if time.time() > end:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_ddp_run_killed_mid_way_resumes_on_another_process_count(tmp_path: Path) -> None:
    """SIGKILL the whole torchrun group after epoch 1's checkpoint; `trainer.resume=auto` with the same
    run_name continues on 1 process (a different count: the data order does not depend on it)."""
    epochs = 20  # tiny epochs take a fraction of a second: enough of them that the kill lands mid-run
    overrides = [*BASE, f"trainer.max_epochs={epochs}", "callbacks.early_stopping=null", "run_name=killed"]
    env = env_for(tmp_path / "logs")
    run_dir = tmp_path / "logs" / "train" / "runs" / "killed"
    proc = subprocess.Popen(torchrun_cmd(overrides, nproc=2), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(run_dir / "checkpoints" / "last.ckpt", proc, timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"
    done = [r["epoch"] for r in metrics(run_dir)]
    assert done and max(done) < epochs
    resumed = run(plain_cmd([*overrides, "trainer.resume=auto"]), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    s = summary(run_dir)
    assert s["status"] == "completed" and s["epochs_completed"] == epochs
    assert [r["epoch"] for r in metrics(run_dir)] == list(range(1, epochs + 1))  # no epoch logged twice
    assert s["global_step"] == epochs * 4  # 16 patches / global batch 4, whatever the process count


# -- BatchNorm over several processes (trainer.sync_batchnorm) ------------------------------------------
BN = [*BASE, "model._target_=tests.distributed.tiny_model.BatchNormNet", "dataset.patch_size=24",
      "trainer.max_epochs=2", "dataset.batch_size=4", "dataset.val_batch_size=4"]


def test_sync_batchnorm_values():
    assert resolve_sync_batchnorm("auto", 2, on_gpu=True) is True
    assert resolve_sync_batchnorm("auto", 2, on_gpu=False) is False  # CPU: each process keeps its own statistics
    assert resolve_sync_batchnorm("auto", 1, on_gpu=True) is False
    assert resolve_sync_batchnorm(False, 4, on_gpu=True) is False
    with pytest.raises(ConfigError, match="needs GPUs"):
        resolve_sync_batchnorm(True, 2, on_gpu=False)
    with pytest.raises(ConfigError, match=r"^trainer\.sync_batchnorm=yes must be one of auto or true or false\.$"):
        check_config(compose_train(["trainer.sync_batchnorm=yes"]))


def _bn_weights_differ(runs: Path, a: str, b: str) -> float:
    wa, wb = _weights(runs / a), _weights(runs / b)
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].is_floating_point())


@pytest.mark.slow
def test_batchnorm_on_cpu_processes_normalises_per_process(tmp_path: Path) -> None:
    """What the docs state for CPU: `auto` leaves BatchNorm per process (2 x b differs from 1 x 2b), and `true`
    is refused in one sentence before any data is read."""
    env = env_for(tmp_path / "logs")
    one = run(plain_cmd([*BN, "run_name=one"]), env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun_cmd([*BN, "run_name=two"], nproc=2), env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _bn_weights_differ(tmp_path / "logs" / "train" / "runs", "one", "two") > 1e-4
    refused = run(torchrun_cmd([*BN, "run_name=three", "trainer.sync_batchnorm=true"], nproc=2), env)
    assert refused.returncode != 0 and "error: trainer.sync_batchnorm=true needs GPUs" in refused.stderr
    assert not (tmp_path / "logs" / "train" / "runs" / "three" / "checkpoints").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm over 2 processes needs 2 CUDA devices")
def test_sync_batchnorm_on_gpus_matches_one_process(tmp_path: Path) -> None:
    """2 GPU processes x b == 1 x 2b for a BatchNorm model with sync_batchnorm=auto; without it they differ."""
    env = env_for(tmp_path / "logs", CUDA_VISIBLE_DEVICES="0,1")
    gpu = [*BN, "trainer.mixed_precision=no"]
    for name, cmd in (("one", plain_cmd([*gpu, "run_name=one"])),
                      ("synced", torchrun_cmd([*gpu, "run_name=synced"], nproc=2)),
                      ("unsynced", torchrun_cmd([*gpu, "run_name=unsynced", "trainer.sync_batchnorm=false"], nproc=2))):
        proc = run(cmd, env)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    runs = tmp_path / "logs" / "train" / "runs"
    assert _bn_weights_differ(runs, "one", "synced") < 1e-4
    assert _bn_weights_differ(runs, "one", "unsynced") > 1e-4  # the test would see a missing conversion
