"""The tracker adapters against the real libraries: MLflow (local store, file store), TensorBoard (read back
with TensorBoard's own event reader), wandb offline. A kill is simulated by starting a second adapter on
the same tracker run without finishing the first, as a resumed process does."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from segplat.engine.loggers import (
    JsonlLogger,
    MlflowLogger,
    RunInfo,
    TensorBoardLogger,
    WandbLogger,
    flatten,
    sweep_facts,
)
from segplat.errors import ConfigError

matplotlib.use("Agg")

CONFIG = {"model": {"_target_": "segplat.models.Segmenter", "encoder": {"name": "resnet10t"}},
          "trainer": {"max_epochs": 3, "resume": None}, "tags": ["fusion", "nir"], "seed": 42,
          "dataset": {"modalities": ["rgb", "nir"]}}


def run_info(run_dir: Path, resume_state=None, resume_step: int = 0, resume_epoch: int = 0, **kw) -> RunInfo:
    return RunInfo(run_dir, run_dir.name, kw.pop("config", CONFIG), ["fusion", "nir"], kw.pop("sweep", {}),
                   "val/miou", resuming=resume_state is not None, resume_step=resume_step, resume_epoch=resume_epoch,
                   resume_state=resume_state, overrides=kw.pop("overrides", None))


def record(epoch: int, miou: float) -> dict:
    return {"epoch": epoch, "step": 4 * epoch, "train/loss": 1.0 / epoch, "val/miou": miou, "val/iou_thin cloud": miou,
            "lr/decoder": 1e-3, "best": miou, "best_epoch": epoch}


def png(path: Path, colour=(255, 0, 0)) -> Path:
    import matplotlib.pyplot as plt

    img = np.zeros((8, 12, 3), np.uint8)
    img[:] = colour
    plt.imsave(path, img)
    return path


def test_flatten_and_sweep_facts(monkeypatch):
    flat = flatten(CONFIG)
    assert flat["model.encoder.name"] == "resnet10t" and flat["trainer.resume"] is None
    assert flat["dataset.modalities"] == '["rgb", "nir"]' and flat["seed"] == 42
    assert sweep_facts(CONFIG) == {}
    pruned = {**CONFIG, "callbacks": {"optuna_pruning": {"study_name": "s1", "trial_number": 7}}}
    assert sweep_facts(pruned) == {"study_name": "s1", "trial_number": 7}
    monkeypatch.setenv("SEGPLAT_STUDY_NAME", "s2")
    monkeypatch.setenv("SEGPLAT_TRIAL_NUMBER", "3")
    assert sweep_facts(CONFIG) == {"study_name": "s2", "trial_number": 3}


def test_jsonl_truncates_on_resume(tmp_path):
    lg = JsonlLogger()
    lg.start(run_info(tmp_path))
    for e in (1, 2, 3):
        lg.log_metrics(record(e, 0.1 * e), 4 * e)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "val/mi')  # torn by a kill
    JsonlLogger().start(run_info(tmp_path, resume_state={}, resume_step=8, resume_epoch=2))
    assert [line.count('"epoch": ') for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 1]


# -- MLflow ------------------------------------------------------------------------------------------
def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One local store for the module: creating MLflow's tables takes seconds."""
    return tmp_path_factory.mktemp("mlflow_store")


@pytest.mark.slow
def test_mlflow_local_store_holds_params_metrics_images_and_tags(store, tmp_path):
    run_dir = tmp_path / "exp1"
    run_dir.mkdir()
    lg = MlflowLogger(store_dir=str(store), experiment_name="unit")
    lg.start(run_info(run_dir, sweep={"study_name": "study-a", "trial_number": 5}))
    for e in (1, 2):
        lg.log_metrics(record(e, 0.2 * e), 4 * e)
    lg.log_images({"val/predictions": png(tmp_path / "epoch_002.png")}, 8)
    lg.log_artifacts([png(tmp_path / "curves.png")])
    lg.log_summary({"best_checkpoint": "/x/best.ckpt", "best_score": 0.4, "status": "completed"})
    lg.finish("completed")

    client = mlflow_client(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert run.info.run_name == "exp1" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.encoder.name"] == "resnet10t" and params["trainer.max_epochs"] == "3"
    assert params["dataset.modalities"] == '["rgb", "nir"]'
    assert history(client, run.info.run_id, "val/miou") == [(4, pytest.approx(0.2)), (8, pytest.approx(0.4))]
    assert history(client, run.info.run_id, "val/iou_thin cloud")[-1][0] == 8
    assert "step" not in run.data.metrics  # the x axis, not a metric
    tags = run.data.tags
    assert {"fusion", "nir"} <= set(tags)
    assert tags["sweep.study_name"] == "study-a" and tags["sweep.trial_number"] == "5"
    assert tags["segplat.best_checkpoint"] == "/x/best.ckpt" and tags["segplat.run_dir"] == str(run_dir)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "visuals")] == ["visuals/epoch_002.png"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/curves.png"]
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(store / "mlartifacts")


@pytest.mark.slow
def test_mlflow_resume_continues_the_run_with_each_step_once(store, tmp_path):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    first = MlflowLogger(store_dir=str(store), experiment_name="resume")
    first.start(run_info(run_dir))
    for e in (1, 2, 3):  # epoch 3 was logged, then the process was killed before its checkpoint
        first.log_metrics(record(e, 0.1 * e), 4 * e)
    saved = first.state_dict()  # what last.ckpt of epoch 2 holds

    resumed_cfg = {**CONFIG, "trainer": {"max_epochs": 4, "resume": "auto"}}
    second = MlflowLogger(store_dir=str(store), experiment_name="resume")
    second.start(run_info(run_dir, resume_state=saved, resume_step=8, resume_epoch=2, config=resumed_cfg))
    for e in (3, 4):
        second.log_metrics(record(e, 0.1 * e), 4 * e)
    second.finish("completed")

    client = mlflow_client(second.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]
    assert [s for s, _ in history(client, saved["run_id"], "val/miou")] == [4, 8, 12, 16]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_epochs"] == "3"  # MLflow keeps a parameter's first value ...
    assert "trainer.max_epochs=4" in run.data.tags["segplat.resumed_with"]  # ... the resumed ones are a tag


@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_mlflow_fresh_start_marks_a_killed_earlier_start(store, tmp_path):
    run_dir = tmp_path / "again"
    run_dir.mkdir()
    orphan = MlflowLogger(store_dir=str(store), experiment_name="orphans")
    orphan.start(run_info(run_dir))  # killed before its first checkpoint: nothing knows this run id
    fresh = MlflowLogger(store_dir=str(store), experiment_name="orphans")
    fresh.start(run_info(run_dir))
    fresh.finish("completed")
    client = mlflow_client(fresh.tracking_uri)
    assert client.get_run(orphan.run_id).info.status == "KILLED"
    assert client.get_run(fresh.run_id).info.status == "FINISHED"


def test_mlflow_file_store(tmp_path, monkeypatch):
    """A `file:` store (MLflow's older format; recent MLflow wants MLFLOW_ALLOW_FILE_STORE=true for it)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    lg = MlflowLogger(tracking_uri=uri)
    lg.start(run_info(tmp_path))
    lg.log_metrics(record(1, 0.5), 4)
    lg.finish("failed")
    run = mlflow_client(uri).get_run(lg.run_id)
    assert run.info.status == "FAILED" and run.data.metrics["val/miou"] == 0.5
    assert (tmp_path / "mlruns").is_dir()


def test_mlflow_unreachable_server_is_one_sentence(tmp_path):
    from tests.distributed.launch_utils import free_port

    lg = MlflowLogger(tracking_uri=f"http://user:secret@127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"logger\.mlflow\.tracking_uri=http://user:\*\*\*@127\.0\.0\.1:\d+ does not "
                                          "answer") as err:
        lg.start(run_info(tmp_path))
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_a_missing_library_is_refused_when_built(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger\.mlflow needs the mlflow package; pip install 'segplat\[tracking"):
        MlflowLogger(store_dir="/tmp")


# -- TensorBoard -------------------------------------------------------------------------------------
def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_images_and_config_read_back(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    lg = TensorBoardLogger()
    lg.start(run_info(tmp_path, sweep={"study_name": "s", "trial_number": 2},
                      overrides=["model.encoder.name=resnet10t", "trainer.max_epochs=3", "logger=[tensorboard]"]))
    for e in (1, 2):
        lg.log_metrics(record(e, 0.2 * e), 4 * e)
    lg.log_images({"val/predictions": png(tmp_path / "p.png", (0, 255, 0))}, 8)
    lg.log_artifacts([png(tmp_path / "curves.png")])
    lg.log_summary({"best_checkpoint": "/x/best.ckpt"})
    lg.finish()
    acc = events(tmp_path / "tensorboard")
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("val/miou")] == [(4, 0.2), (8, 0.4)]
    (image,) = acc.Images("val/predictions")
    assert image.step == 8 and (image.width, image.height) == (12, 8)
    assert [e.step for e in acc.Images("plots/curves")] == [8]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.encoder.name"].string_value == "resnet10t"
    assert hparams["trainer.max_epochs"].number_value == 3 and hparams["sweep.trial_number"].number_value == 2
    assert "logger" not in hparams and "seed" not in hparams  # what the command line set, not the whole config
    assert "tags/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_resume_purges_the_steps_trained_again(tmp_path):
    first = TensorBoardLogger()
    first.start(run_info(tmp_path))
    for e in (1, 2, 3):
        first.log_metrics(record(e, 0.1 * e), 4 * e)
    saved = first.state_dict()  # killed here (no finish); the checkpoint is from epoch 2 (step 8)
    # a resume is a later process: its event file sorts after the killed one's (names hold the second and a
    # per-process counter, which in one test process can sort "...0.10" before "...0.9")
    time.sleep(1.05 - time.time() % 1)
    second = TensorBoardLogger()
    second.start(run_info(tmp_path, resume_state=saved, resume_step=8, resume_epoch=2))
    for e in (3, 4):
        second.log_metrics(record(e, 0.5 + 0.1 * e), 4 * e)
    second.finish()
    values = [(e.step, round(e.value, 6)) for e in events(tmp_path / "tensorboard").Scalars("val/miou")]
    assert values == [(4, 0.1), (8, 0.2), (12, 0.8), (16, 0.9)]


def test_tensorboard_fresh_start_hides_an_earlier_attempt(tmp_path):
    old = TensorBoardLogger()
    old.start(run_info(tmp_path))
    old.log_metrics(record(1, 0.9), 4)
    old.finish()
    new = TensorBoardLogger()
    new.start(run_info(tmp_path))
    new.log_metrics(record(1, 0.1), 4)
    new.finish()
    assert [round(e.value, 6) for e in events(tmp_path / "tensorboard").Scalars("val/miou")] == [0.1]


def test_tensorboard_log_images_false_keeps_the_end_plots(tmp_path):
    """log_images=false also dropped curves.png and the confusion matrix (MLflow logs them either way)."""
    lg = TensorBoardLogger(log_images=False)
    lg.start(run_info(tmp_path))
    lg.log_metrics(record(1, 0.5), 4)
    lg.log_images({"val/predictions": png(tmp_path / "p.png", (0, 255, 0))}, 4)
    lg.log_artifacts([png(tmp_path / "curves.png")])
    lg.finish()
    assert events(tmp_path / "tensorboard").Tags()["images"] == ["plots/curves"]


def test_tensorboard_runs_sharing_a_log_dir_each_keep_their_curves(tmp_path):
    """Written straight into a shared log_dir, each new run purged every earlier run's events."""
    shared = tmp_path / "shared"
    for name, miou in (("a", 0.3), ("b", 0.7)):
        lg = TensorBoardLogger(log_dir=str(shared))
        lg.start(run_info(tmp_path / name))
        lg.log_metrics(record(1, miou), 4)
        lg.finish()
    assert sorted(p.name for p in shared.iterdir()) == ["a", "b"]
    for name, miou in (("a", 0.3), ("b", 0.7)):
        assert [round(e.value, 6) for e in events(shared / name).Scalars("val/miou")] == [miou]


# -- wandb -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wandb_offline_run_and_its_resume_id(tmp_path):
    lg = WandbLogger(mode="offline", project="unit")
    lg.start(run_info(tmp_path, sweep={"study_name": "s", "trial_number": 1}))
    lg.log_metrics(record(1, 0.3), 4)
    saved = lg.state_dict()
    assert lg.run.group == "s" and set(lg.run.tags) == {"fusion", "nir"}
    assert lg.run.config["model"]["encoder"]["name"] == "resnet10t" and lg.run.config["sweep"]["trial_number"] == 1
    lg.finish()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{saved['run_id']}"))
    again = WandbLogger(mode="offline", project="unit")
    again.start(run_info(tmp_path, resume_state=saved, resume_step=4, resume_epoch=1))
    assert again.state_dict() == saved
    again.finish()
    with pytest.raises(ConfigError, match=r"logger\.wandb\.mode='disabled'"):
        WandbLogger(mode="disabled")
