"""A plain run's best checkpoint as an MLflow model (local store): read back by `mlflow.pytorch.load_model`, it predicts
the logits `segplat.load_model` predicts; `logger.mlflow.register_as` registers it; nothing is written where the
command runs (MLflow's fluent API, unset, would create its own store there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segplat.train import train
from tests.conftest import TINY, compose_train


@pytest.mark.slow
def test_a_runs_best_model_is_an_mlflow_model(tmp_path: Path, monkeypatch) -> None:
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    import segplat
    from segplat.engine.forward import forward_batch
    from segplat.engine.loggers.mlflow_model import input_example

    cwd, run_dir, store = tmp_path / "cwd", tmp_path / "run", tmp_path / "store"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    train(compose_train([*(a for a in TINY if not a.startswith("logger=")), "trainer.max_epochs=1",
                         "logger=[jsonl,mlflow]", f"logger.mlflow.store_dir={store}",
                         "logger.mlflow.register_as=plain_best"], output_dir=run_dir))
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("segplat").experiment_id])
    (version,) = client.search_model_versions("name='plain_best'")
    assert version.run_id == run.info.run_id

    loaded = segplat.load_model(run_dir)
    example = input_example(loaded, seed=3)
    assert {k: (v.dtype, v.shape[:2]) for k, v in example.items()} == {
        m: (np.dtype(s.dtype), (1, len(s.bands))) for m, s in loaded.specs.items()}
    batch = {k: torch.as_tensor(v) for k, v in example.items()}
    expected = forward_batch(loaded.model, loaded.preprocessor, batch, "cpu")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for model_uri in (run.data.tags["segplat.model_uri"], "models:/plain_best/1"):
            assert torch.equal(mlflow.pytorch.load_model(model_uri)(batch), expected), model_uri
    finally:
        mlflow.set_tracking_uri(previous)
    # the artifacts are in the store's folder, and the working folder holds nothing
    assert list((store / "mlartifacts").rglob("MLmodel")) and list(cwd.iterdir()) == []
