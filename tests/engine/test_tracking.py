"""Trackers in real training runs: what MLflow (a local store and a real `mlflow server` with a SQLite backend)
and TensorBoard hold after a run and its resume, read back through their own clients and readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segplat.engine.checkpoint import load_checkpoint
from segplat.train import train
from tests.conftest import TINY, compose_train

QUICK = [*TINY, "callbacks.visuals.every_n_epochs=1", "callbacks.early_stopping=null"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def mlflow_runs(uri: str, experiment: str = "segplat"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def check_mlflow_run(client, run, run_dir: Path) -> None:
    """Params = the flattened config, each metric of metrics.jsonl at its step once, panels and plots as artifacts."""
    recs = records(run_dir)
    steps = [r["step"] for r in recs]
    for key in ("val/miou", "val/loss", "train/loss", "lr/decoder", "val/iou_thin_cloud"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in hist] == steps, key
        assert [v for _, v in hist] == pytest.approx([r[key] for r in recs], rel=1e-6), key
    params = run.data.params
    assert params["model.encoder.name"] == "resnet10t" and params["dataset.patch_size"] == "32"
    assert params["model.decoder.channels"] == "[16, 16, 16, 16]"
    visuals = [a.path for a in client.list_artifacts(run.info.run_id, "visuals")]
    assert visuals == [f"visuals/epoch_{r['epoch']:03d}.png" for r in recs]
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/curves.png", "plots/confusion_matrix.png"} <= plots
    assert run.data.tags["segplat.best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_mlflow_and_tensorboard_follow_a_run_and_its_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, store = tmp_path / "run", tmp_path / "store"
    trackers = ["logger=[jsonl,mlflow,tensorboard]", f"logger.mlflow.store_dir={store}", "tags=[fusion,unit]"]
    train(compose_train([*QUICK, *trackers, "trainer.max_epochs=2"], output_dir=run_dir))
    saved = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["loggers"]
    assert set(saved) == {"jsonl", "mlflow", "tensorboard"}
    train(compose_train([*QUICK, *trackers, "trainer.max_epochs=3", "trainer.resume=auto"], output_dir=run_dir))
    assert [r["epoch"] for r in records(run_dir)] == [1, 2, 3]

    client, runs = mlflow_runs(f"sqlite:///{store / 'mlflow.db'}")
    assert [r.info.run_id for r in runs] == [saved["mlflow"]["run_id"]]  # the resume continued the same run
    check_mlflow_run(client, runs[0], run_dir)
    assert {"fusion", "unit"} <= set(runs[0].data.tags)

    acc = EventAccumulator(saved["tensorboard"]["log_dir"], size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert saved["tensorboard"]["log_dir"] == str(run_dir / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("val/miou")] == \
        [(r["step"], pytest.approx(r["val/miou"], rel=1e-6)) for r in records(run_dir)]
    assert [e.step for e in acc.Images("val/predictions")] == [r["step"] for r in records(run_dir)]


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import requests

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {proc.stderr.read()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer within {timeout} s")


@pytest.fixture
def mlflow_server(tmp_path):
    from tests.distributed.launch_utils import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server_artifacts")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc, timeout=180)
        yield url, tmp_path / "server_artifacts"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can take longer on a loaded machine
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_a_run_logged_to_a_real_mlflow_server(tmp_path, mlflow_server):
    url, artifacts = mlflow_server
    run_dir = tmp_path / "served"
    train(compose_train([*QUICK, "trainer.max_epochs=2", "logger=[jsonl,mlflow]", f"logger.mlflow.tracking_uri={url}",
                         "logger.mlflow.experiment_name=served"], output_dir=run_dir))
    client, runs = mlflow_runs(url, "served")
    assert len(runs) == 1
    check_mlflow_run(client, runs[0], run_dir)
    # the server stored the artifacts it was sent (proxied artifact storage)
    assert sorted(p.name for p in artifacts.rglob("epoch_*.png")) == ["epoch_001.png", "epoch_002.png"]
