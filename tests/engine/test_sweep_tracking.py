"""A sweep as MLflow and TensorBoard users read it, against a real `mlflow server` on 127.0.0.1: one parent run with
every trial a nested child, the best trial's model an MLflow model that `mlflow.pytorch.load_model` reads back and
that predicts the logits `segplat.load_model` does, registered under `logger.mlflow.register_as`; TensorBoard's
HParams experiment and sessions in the sweep folder; no `./mlruns` where the command ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from tests.conftest import TINY
from tests.engine.test_tracking import mlflow_server  # noqa: F401  (the real server fixture)

pytestmark = pytest.mark.slow

SWEEP = """# @package _global_
defaults:
  - override /hydra/sweeper: segplat_optuna
  - override /hydra/sweeper/sampler: random
callbacks:
  early_stopping: null
trainer:
  max_epochs: 1
hydra:
  sweeper:
    study_name: tracked
    n_trials: 2
    sampler: {seed: 0}
    pruner: {name: none}
    params:
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
      optimizer.weight_decay: choice(0.0, 0.01)
"""


def test_a_sweep_in_mlflow_and_tensorboard(tmp_path: Path, mlflow_server) -> None:  # noqa: F811
    import mlflow
    import mlflow.models
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    import segplat
    from segplat.engine.forward import forward_batch
    from segplat.engine.loggers.mlflow_model import input_example

    url, _ = mlflow_server
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "tracked.yaml").write_text(SWEEP)
    sweep_dir, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "segplat.train", "--multirun", "sweep=tracked", f"hydra.searchpath=[file://{tmp_path}]",
           f"hydra.sweep.dir={sweep_dir}", *[a for a in TINY if not a.startswith("logger=")], "trainer=cpu",
           "trainer.limit_val_batches=1", "logger=[jsonl,mlflow,tensorboard]", f"logger.mlflow.tracking_uri={url}",
           "logger.mlflow.experiment_name=sweeps", "logger.mlflow.register_as=tiny_best"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-4000:]
    study = optuna.load_study(study_name="tracked", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]

    # -- MLflow: one parent, every trial its child ------------------------------------------------------
    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("segplat.sweep") == "parent"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["sweep.trial_number"]))
    assert len(runs) == 3 and [r.data.tags["mlflow.parentRunId"] for r in children] == [parent.info.run_id] * 2
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    assert study.user_attrs["segplat_mlflow_parent_run"] == parent.info.run_id
    for child, trial in zip(children, study.trials, strict=True):  # each child holds its trial's draw and curve
        assert float(child.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert child.data.metrics["val/miou"] == pytest.approx(trial.value)
        assert "segplat.model_uri" not in child.data.tags  # the sweep logs its best trial's model, once
    params = parent.data.params
    assert params["study_name"] == "tracked" and params["n_trials"] == "2"
    assert params["sampler"] == "optuna.samplers.RandomSampler"
    assert params["space.optimizer.lr"] == "numbers from 0.0001 to 0.01 (log scale)"
    assert params["space.optimizer.weight_decay"] == "one of 0.0, 0.01"
    best = study.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    tags = parent.data.tags
    assert tags["segplat.best_trial"] == str(best.number) and float(tags["best.optimizer.lr"]) == \
        pytest.approx(best.params["optimizer.lr"])
    assert tags["segplat.best_run_id"] == children[best.number].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"history.png", "trials.csv", "optimization_results.yaml", "best.yaml"} <= artifacts

    # -- the best trial's model: MLflow reads it back, it predicts what segplat.load_model predicts --------
    loaded = segplat.load_model(best.user_attrs["run_dir"])
    batch = {k: torch.as_tensor(v) for k, v in input_example(loaded, seed=5).items()}
    expected = forward_batch(loaded.model, loaded.preprocessor, batch, "cpu")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)  # the URIs below are the server's (MLflow's default store is a local file)
    try:
        for uri in (tags["segplat.model_uri"], "models:/tiny_best/1"):
            served = mlflow.pytorch.load_model(uri)
            assert torch.equal(served(batch), expected), uri
        # the signature: one named tensor per modality (its dtype, bands), the logits one channel per class
        info = mlflow.models.get_model_info(tags["segplat.model_uri"])
        inputs = info.signature.inputs.inputs
        assert [(s.name, s.type, s.shape) for s in inputs] == [
            (m, spec_dtype, (-1, len(loaded.specs[m].bands), -1, -1)) for m, spec_dtype in
            ((m, batch[m].numpy().dtype) for m in loaded.modalities)]
        assert info.signature.outputs.inputs[0].shape == (-1, len(loaded.classes), -1, -1)
    finally:
        mlflow.set_tracking_uri(previous)
    (version,) = client.search_model_versions("name='tiny_best'")
    assert version.run_id == parent.info.run_id

    # -- TensorBoard: the HParams tab of the sweep folder compares the trials on the searched keys ---------
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content["."][metadata.EXPERIMENT_TAG])
    assert {h.name for h in experiment.hparam_infos} == {"optimizer.lr", "optimizer.weight_decay"}
    assert [m.name.tag for m in experiment.metric_infos] == ["val/miou", "best/val/miou"]
    for trial in study.trials:
        run = f"trial_{trial.number:04d}/tensorboard"
        start = metadata.parse_session_start_info_plugin_data(content[run][metadata.SESSION_START_INFO_TAG])
        assert start.hparams["optimizer.lr"].number_value == pytest.approx(trial.params["optimizer.lr"])
        assert start.hparams["optimizer.weight_decay"].number_value == trial.params["optimizer.weight_decay"]
        assert start.group_name == "tracked"
        assert [e.value for e in mux.Scalars(run, "best/val/miou")] == [pytest.approx(trial.value)]

    assert not (cwd / "mlruns").exists() and sorted(p.name for p in cwd.iterdir()) == []
