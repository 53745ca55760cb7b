"""The checkpoint schema (what last.ckpt and best.ckpt hold) and the run-folder rule (a folder that holds a run
is never trained into from scratch; resume bookkeeping after a kill during a save)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from segplat.engine.checkpoint import (
    INFERENCE_KEYS,
    TRAINING_KEYS,
    DataFacts,
    RunFacts,
    inference_state,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    training_state,
)
from segplat.errors import CheckpointError, ConfigError


def full_state() -> dict:
    weights = {"w": torch.randn(4, 4)}
    return training_state(RunFacts({"model_target": "m"}, {"classes": ["a", "b"]}, "model: {}\n"), model=weights,
                          optimizer={"state": {0: {"exp_avg": torch.randn(4, 4)}}, "param_groups": []},
                          scheduler=None, scaler=None, rng={"python": 1}, trainer={"epoch": 2, "global_step": 8},
                          callbacks={}, loggers={"mlflow": {"run_id": "abc"}})


def test_the_two_kinds_hold_what_the_schema_says(tmp_path):
    state = full_state()
    assert set(state) == {"kind", *TRAINING_KEYS}
    save_checkpoint(tmp_path / "last.ckpt", state)
    save_checkpoint(tmp_path / "best.ckpt", inference_state(state))
    last, best = load_checkpoint(tmp_path / "last.ckpt"), load_checkpoint(tmp_path / "best.ckpt")
    assert last["kind"] == "training" and best["kind"] == "inference"
    assert set(best) == {"format", "kind", *INFERENCE_KEYS}
    assert torch.equal(best["model"]["w"], last["model"]["w"]) and best["data"] == {"classes": ["a", "b"]}
    assert (tmp_path / "best.ckpt").stat().st_size < (tmp_path / "last.ckpt").stat().st_size


# the data section exactly as main's RunFacts.of_run wrote it (a dict built key by key), with a 1/8 grid modality
MAIN_DATA = {"classes": ["clear", "cloud"], "palette": [[0, 0, 0], [255, 255, 255]], "ignore_index": 255,
             "modalities": {"rgb": {"bands": ["r", "g", "b"], "nodata": None, "dtype": "uint8", "optical": True,
                                    "scale": 1.0, "temporal": False, "max_time": None},
                            "air": {"bands": ["no2"], "nodata": "nan", "dtype": "float32", "optical": False,
                                    "scale": 0.125, "temporal": False, "max_time": None}},
             "stats": {"rgb": {"mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0], "p2": [0, 0, 0], "p98": [9, 9, 9]},
                       "air": {"mean": [0.5], "std": [0.1], "p2": [0.0], "p98": [1.0]}},
             "patch_size": 64, "dataset": "airquality"}


def test_the_data_section_has_one_writer_and_one_reader(tmp_path: Path) -> None:
    """A checkpoint written by main (before the section was a type) reads back through `weights_only=True`; the writer
    writes exactly that shape; a missing or odd field is one sentence naming the file."""
    path = save_checkpoint(tmp_path / "old.ckpt", {"model": {}, "data": MAIN_DATA, "config": "model: {}\n"})
    facts = DataFacts.from_state(load_checkpoint(path)["data"], path)
    assert facts.to_state() == MAIN_DATA
    assert facts.specs["air"].scale == 0.125 and np.isnan(facts.specs["air"].nodata)
    assert (facts.patch_size, facts.dataset, facts.classes) == (64, "airquality", ["clear", "cloud"])
    info = SimpleNamespace(classes=facts.classes, palette=MAIN_DATA["palette"], ignore_index=255,
                           specs=facts.specs, stats=MAIN_DATA["stats"])
    assert DataFacts.of(info, 64, "airquality").to_state() == MAIN_DATA
    broken = {"no data": (None, r"carries no data facts"),
              "missing": ({k: v for k, v in MAIN_DATA.items() if k != "patch_size"}, r"lacks patch_size"),
              "odd type": ({**MAIN_DATA, "patch_size": "64"}, r"data.patch_size=64 must be a positive integer"),
              "odd spec": ({**MAIN_DATA, "modalities": {"rgb": {"bands": ["r"], "colour": 1}}}, r"is not what"),
              "no stats": ({**MAIN_DATA, "stats": {"rgb": MAIN_DATA["stats"]["rgb"]}}, r"no statistics for air"),
              "palette": ({**MAIN_DATA, "palette": [[0, 0, 0]]}, r"1 palette colours for 2 classes")}
    for data, message in broken.values():
        with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path}/x.ckpt: .*{message}.*; it was not "
                                                  r"written by this segplat"):
            DataFacts.from_state(data, tmp_path / "x.ckpt")


def run_folder(tmp_path: Path, checkpoints=(), records: int = 0) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = full_state()
    for name in checkpoints:
        save_checkpoint(run / "checkpoints" / name, state if name == "last.ckpt" else inference_state(state))
    if records:
        (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, records + 1)))
    return run


@pytest.mark.parametrize("held", [("last.ckpt", "best.ckpt"), ()])
def test_a_fresh_start_into_a_folder_with_a_run_stops_in_one_sentence(tmp_path, held):
    run = run_folder(tmp_path, held, records=2)
    with pytest.raises(ConfigError) as err:
        resume_point(run, None)
    msg = str(err.value)
    assert msg.startswith(f"run folder {run} already holds a run") and "metrics.jsonl (2 records)" in msg
    assert "trainer.resume=auto" in msg and "run_name" in msg and "trainer.overwrite=true" in msg and "\n" not in msg
    assert (run / "metrics.jsonl").is_file() and len(list((run / "checkpoints").iterdir())) == len(held)


def test_overwrite_clears_the_history(tmp_path, caplog):
    run = run_folder(tmp_path, ("last.ckpt", "best.ckpt"), records=3)
    (run / "visuals").mkdir()
    (run / "summary.json").write_text("{}")
    (run / "config.yaml").write_text("seed: 1\n")
    with caplog.at_level(logging.WARNING, "segplat"):
        assert resume_point(run, None, overwrite=True).path is None
    assert "trainer.overwrite=true: cleared" in caplog.text
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    with pytest.raises(ConfigError, match="set only one of them"):
        resume_point(run, "auto", overwrite=True)


def test_resume_auto_after_a_kill_during_the_first_save(tmp_path, caplog):
    """Killed while writing the first last.ckpt: metrics.jsonl has epoch 1, a temporary file is left, no checkpoint.
    resume=auto starts afresh, clears the partial history (and says so) and removes the temporary file."""
    run = run_folder(tmp_path, records=1)
    tmp = run / "checkpoints" / ".last.ckpt.k3j2h1.tmp"
    tmp.write_bytes(b"\0" * 4096)
    with caplog.at_level(logging.INFO, "segplat"):
        start = resume_point(run, "auto")
    assert start.path is None and start.load() is None
    assert not tmp.exists() and not (run / "metrics.jsonl").exists()
    assert "no checkpoint yet" in caplog.text and "metrics.jsonl (1 records)" in caplog.text
    assert "removed 1 temporary file" in caplog.text


def test_resume_auto_resolves_last_and_loads_it_once(tmp_path, monkeypatch):
    run = run_folder(tmp_path, ("last.ckpt", "best.ckpt"), records=2)
    start = resume_point(run, "auto")
    assert start.path == run / "checkpoints" / "last.ckpt"
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    start.load()
    state = start.take()
    assert state["loggers"] == {"mlflow": {"run_id": "abc"}} and len(loads) == 1


def test_resume_auto_with_only_best_refuses(tmp_path):
    run = run_folder(tmp_path, ("best.ckpt",), records=2)
    with pytest.raises(ConfigError, match=r"no checkpoints/last\.ckpt to resume from"):
        resume_point(run, "auto")


def test_resuming_from_a_best_checkpoint_is_refused(tmp_path):
    run = run_folder(tmp_path, ("best.ckpt",))
    with pytest.raises(CheckpointError, match=r"holds weights for prediction only .* model\.pretrained"):
        resume_point(tmp_path / "new", str(run / "checkpoints" / "best.ckpt")).load()


def test_resuming_another_run_into_a_folder_with_history_is_refused(tmp_path):
    other = run_folder(tmp_path, ("last.ckpt",))
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ConfigError, match="continues another run"):
        resume_point(mine, str(other))
    assert resume_point(tmp_path / "fresh", str(other)).path == other / "checkpoints" / "last.ckpt"


def test_only_the_main_process_changes_files(tmp_path):
    run = run_folder(tmp_path, records=1)
    (run / "checkpoints" / ".last.ckpt.x.tmp").write_bytes(b"x")
    assert resume_point(run, "auto", main_process=False).path is None  # the same decision ...
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints" / ".last.ckpt.x.tmp").exists()  # ... no writes


def test_a_resume_refuses_optimiser_and_schedule_changes_it_would_not_apply(tmp_path):
    """The optimiser's param groups and the schedule come back from last.ckpt: a new optimizer.lr was written to
    config.yaml but trained with the old one. Keys that follow trainer.max_epochs may change (extending a run)."""
    from segplat.rules import check_resumed_config
    from tests.conftest import compose_train

    run_cfg = compose_train(["trainer.max_epochs=4"], tmp_path)
    stored = yaml.safe_dump({k: OmegaConf.to_container(run_cfg[k], resolve=True)
                             for k in ("optimizer", "scheduler", "trainer")})
    state = {**full_state(), "config": stored}  # two epochs done
    check_resumed_config(state, compose_train(["trainer.max_epochs=9"], tmp_path), "last.ckpt")
    with pytest.raises(ConfigError, match=r"^trainer\.resume: optimizer\.lr=1e-05 \(the run's: 0\.002\) differ"):
        check_resumed_config(state, compose_train(["trainer.max_epochs=4", "optimizer.lr=1e-5"], tmp_path), "x")
    with pytest.raises(ConfigError, match=r"scheduler\.kind=cosine \(the run's: \w+\)"):
        check_resumed_config(state, compose_train(["trainer.max_epochs=4", "scheduler.kind=cosine"], tmp_path), "x")
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs=1 but the run in x has already completed 2 epochs"):
        check_resumed_config(state, compose_train(["trainer.max_epochs=1"], tmp_path), "x")
