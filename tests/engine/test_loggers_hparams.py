"""TensorBoard's HParams data, read back with TensorBoard's own event reader: each run a session (the keys its
command line set, its status, the best value of the monitored metric), a sweep folder one experiment (the searched
keys with their domains), so the HParams tab of a sweep folder compares its trials."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import api_pb2, metadata

from segplat.engine.loggers import RunInfo, TensorBoardLogger
from segplat.engine.loggers.tensorboard import write_hparams_experiment

CONFIG = {"optimizer": {"lr": 0.002, "weight_decay": 0.01}, "fusion": {"level": "mid", "stages": [2, 3]},
          "model": {"encoder": {"name": "resnet10t"}}, "seed": 42}


def read(folder: Path) -> EventMultiplexer:
    mux = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    return mux


def plugin_data(mux: EventMultiplexer, run: str, tag: str):
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)[run][tag]
    return metadata.parse_experiment_plugin_data(content) if tag == metadata.EXPERIMENT_TAG else (
        metadata.parse_session_start_info_plugin_data(content) if tag == metadata.SESSION_START_INFO_TAG
        else metadata.parse_session_end_info_plugin_data(content))


def test_runinfo_hparams_are_the_command_lines_keys() -> None:
    run = RunInfo(Path("r"), "r", CONFIG, sweep={"study_name": "s", "trial_number": 4}, overrides=[
        "optimizer.lr=0.002", "fusion.stages=[2,3]", "model=unet", "+callbacks.optuna_pruning.trial_id=9",
        "logger.mlflow.tracking_uri=http://x", "hydra.run.dir=/tmp/x", "~callbacks.early_stopping", "seed=42"])
    assert run.hparams == {"optimizer.lr": 0.002, "fusion.stages": "[2,3]", "model": "unet", "seed": 42,
                           "sweep.study_name": "s", "sweep.trial_number": 4}


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_sweep_folder_compares_its_trials(tmp_path: Path, status: str) -> None:
    write_hparams_experiment(tmp_path, {"optimizer.lr": (1e-4, 1e-2), "fusion.stages": ["[2,3]", "[3]"],
                                        "seed": [1, 2]}, ["val/miou", "best/val/miou"])
    for number, (lr, best) in enumerate(((0.002, 0.4), (0.005, 0.6))):
        lg = TensorBoardLogger()
        config = {**CONFIG, "optimizer": {"lr": lr, "weight_decay": 0.01}}
        lg.start(RunInfo(tmp_path / f"trial_{number:04d}", f"trial_{number:04d}", config,
                         sweep={"study_name": "s", "trial_number": number},
                         overrides=[f"optimizer.lr={lr}", "fusion.stages=[2,3]", "trainer.max_epochs=1"]))
        lg.log_metrics({"val/miou": best - 0.1, "step": 4}, 4)
        lg.log_metrics({"val/miou": best, "step": 8}, 8)
        lg.log_summary({"best_score": best, "status": status})
        lg.finish(status)

    mux = read(tmp_path)
    experiment = plugin_data(mux, ".", metadata.EXPERIMENT_TAG)
    infos = {h.name: h for h in experiment.hparam_infos}
    assert set(infos) == {"optimizer.lr", "fusion.stages", "seed"}
    assert (infos["optimizer.lr"].domain_interval.min_value, infos["optimizer.lr"].domain_interval.max_value) == \
        (1e-4, 1e-2)
    assert [v.string_value for v in infos["fusion.stages"].domain_discrete.values] == ["[2,3]", "[3]"]
    assert infos["seed"].type == api_pb2.DATA_TYPE_FLOAT64
    assert [m.name.tag for m in experiment.metric_infos] == ["val/miou", "best/val/miou"]
    for number, (lr, best) in enumerate(((0.002, 0.4), (0.005, 0.6))):
        run = f"trial_{number:04d}/tensorboard"
        start = plugin_data(mux, run, metadata.SESSION_START_INFO_TAG)
        assert start.hparams["optimizer.lr"].number_value == lr
        assert start.hparams["fusion.stages"].string_value == "[2,3]" and start.group_name == "s"
        assert start.hparams["sweep.trial_number"].number_value == number
        end = plugin_data(mux, run, metadata.SESSION_END_INFO_TAG)
        assert end.status == (api_pb2.STATUS_SUCCESS if status == "completed" else api_pb2.STATUS_FAILURE)
        assert [round(e.value, 6) for e in mux.Scalars(run, "best/val/miou")] == [best]


def test_a_resumed_run_keeps_one_session(tmp_path: Path) -> None:
    first = TensorBoardLogger()
    first.start(RunInfo(tmp_path, "r", CONFIG, overrides=["optimizer.lr=0.002"]))
    first.log_metrics({"val/miou": 0.1}, 4)
    saved = first.state_dict()  # killed here
    second = TensorBoardLogger()
    second.start(RunInfo(tmp_path, "r", CONFIG, overrides=["optimizer.lr=0.002"], resuming=True, resume_step=4,
                         resume_state=saved))
    second.log_metrics({"val/miou": 0.2}, 8)
    second.log_summary({"best_score": 0.2})
    second.finish("completed")
    mux = read(tmp_path)
    start = plugin_data(mux, "tensorboard", metadata.SESSION_START_INFO_TAG)
    assert dict(start.hparams)["optimizer.lr"].number_value == 0.002
    assert plugin_data(mux, "tensorboard", metadata.SESSION_END_INFO_TAG).status == api_pb2.STATUS_SUCCESS
