"""Resume and prediction trust nothing in a checkpoint that they should not: its stored config is parsed within
bounds (a "billion laughs" is refused in well under a second), and no path read from it chooses where files go."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from segplat.engine.checkpoint import (
    inference_config,
    resume_point,
    run_config_target,
    save_checkpoint,
    stored_config,
)
from segplat.engine.loggers import RunInfo, TensorBoardLogger
from segplat.errors import CheckpointError
from segplat.inference import load_for_inference
from segplat.rules import check_resumed_config
from segplat.utils.bounded_yaml import MAX_BYTES, MAX_VALUES, expanded_size, load_bounded
from tests.conftest import compose_train


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """`l0: &l0 [lol x 10]`, `l1: &l1 [*l0 x 10]`, ... : 10^9 values from under 1 KB, under a `model` key."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"model: {{_target_: segplat.models.Segmenter, encoder: *l{levels - 1}}}")
    return "\n".join(lines) + "\n"


def training_state(config: str) -> dict:
    """A minimal full training state (`last.ckpt` kind) holding `config` as its stored YAML."""
    return {"kind": "training", "model": {"w": torch.zeros(1)}, "optimizer": {}, "scheduler": None, "scaler": None,
            "rng": {}, "trainer": {"epoch": 1, "global_step": 4}, "callbacks": {}, "loggers": {}, "meta": {},
            "data": {"classes": ["a", "b"], "modalities": {}, "stats": {}, "palette": [[0, 0, 0], [1, 1, 1]],
                     "ignore_index": 255}, "config": config}


def test_billion_laughs_is_refused_in_well_under_a_second() -> None:
    text = billion_laughs()
    assert len(text) < 1000
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="billion laughs") as err:
        stored_config(text, "last.ckpt")
    assert time.perf_counter() - started < 1.0
    assert "\n" not in str(err.value) and "use a checkpoint written by segplat" in str(err.value)
    # the same document without the fan-out is read (the bound is on expansion, not on aliases as such)
    assert stored_config(billion_laughs(levels=2, width=3), "x")["model"]["encoder"] == [["lol"] * 3] * 3


def test_crafted_last_ckpt_with_a_billion_laughs_config_stops_resume_and_prediction(tmp_path: Path) -> None:
    """Through the real paths: `trainer.resume=auto` on a run folder whose last.ckpt holds it, and prediction."""
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "last.ckpt", training_state(billion_laughs()))
    start = resume_point(run_dir, "auto")
    state = start.load()
    cfg = compose_train([], output_dir=run_dir)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="billion laughs"):
        check_resumed_config(state, cfg, start.path)
    with pytest.raises(CheckpointError, match="billion laughs"):
        load_for_inference(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match="billion laughs"):
        inference_config(state, start.path)
    assert time.perf_counter() - started < 3.0  # three refusals, each well under a second


def test_a_run_folders_config_yaml_is_read_within_bounds_too(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(billion_laughs())
    with pytest.raises(CheckpointError, match="billion laughs"):
        run_config_target(tmp_path)
    (tmp_path / "config.yaml").write_text("model: {_target_: segplat.models.Segmenter}\n")
    assert run_config_target(tmp_path) == "segplat.models.Segmenter"


@pytest.mark.parametrize(("text", "says"), [
    ("a: &a [*a]\n", "contains itself"),
    ("[" * 5000 + "]" * 5000, "not valid YAML|too deeply"),
    ("model: {a: 1\n", "not valid YAML"),
    ("- just\n- a list\n", "not a mapping"),
    ("model: !!python/object/apply:os.system [echo owned]\n", "not valid YAML"),
])
def test_other_hostile_configs_are_one_sentence(text: str, says: str) -> None:
    with pytest.raises(CheckpointError, match=says) as err:
        stored_config(text, "last.ckpt")
    assert "\n" not in str(err.value)


def test_size_bound() -> None:
    text = "k: " + "x" * MAX_BYTES + "\n"
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="MiB of YAML"):
        stored_config(text, "last.ckpt")
    assert time.perf_counter() - started < 1.0
    with pytest.raises(CheckpointError, match="not YAML text"):
        stored_config(b"model: {}", "last.ckpt")


def test_expanded_size_counts_what_a_walk_meets() -> None:
    shared = [1, 2, 3]
    assert expanded_size({"a": shared, "b": shared}) == 1 + 2 * (1 + 4)  # keys count, the shared list twice
    assert expanded_size("x") == 1
    data = load_bounded("a: &a [1, 2]\nb: [*a, *a]\n", "x", CheckpointError, "fix")
    assert data == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    assert expanded_size(data) < MAX_VALUES


# -- paths kept in last.ckpt -------------------------------------------------------------------------------
def run_info(run_dir: Path, kept) -> RunInfo:
    return RunInfo(run_dir, run_dir.name, {}, [], {}, "val/miou", resuming=True, resume_step=4, resume_epoch=1,
                   resume_state={"log_dir": kept})


@pytest.mark.parametrize("kept", ["/tmp/elsewhere", "../../outside", "", 42])
def test_tensorboard_never_follows_a_folder_from_the_checkpoint(tmp_path: Path, kept) -> None:
    run_dir = tmp_path / "runs" / "r1"
    elsewhere = tmp_path / "elsewhere"
    lg = TensorBoardLogger()
    value = str(elsewhere) if kept == "/tmp/elsewhere" else kept
    with pytest.raises(CheckpointError, match="a checkpoint never chooses where files go") as err:
        lg.start(run_info(run_dir, value))
    assert "\n" not in str(err.value) and "logger.tensorboard.log_dir" in str(err.value)
    assert not elsewhere.exists() and not (run_dir / "tensorboard").exists()  # nothing written anywhere


def test_tensorboard_resumes_its_own_folder_also_after_the_run_folder_moved(tmp_path: Path) -> None:
    run_dir = tmp_path / "new" / "r1"
    for kept in (str(run_dir / "tensorboard"), str(tmp_path / "old" / "r1" / "tensorboard")):
        lg = TensorBoardLogger()
        lg.start(run_info(run_dir, kept))
        assert lg.state_dict() == {"log_dir": str(run_dir / "tensorboard")}
        lg.finish()
    assert not (tmp_path / "old").exists()
    # a shared log_dir from the config: log_dir/<run name>; the same run under another shared folder is refused
    shared = tmp_path / "shared"
    lg = TensorBoardLogger(log_dir=str(shared))
    lg.start(run_info(run_dir, str(shared / "r1")))
    assert lg.state_dict() == {"log_dir": str(shared / "r1")}
    lg.finish()
    with pytest.raises(CheckpointError, match="resume with the log_dir the run started with"):
        TensorBoardLogger(log_dir=str(tmp_path / "other")).start(run_info(run_dir, str(shared / "r1")))


@pytest.mark.slow
def test_a_crafted_last_ckpt_is_refused_on_resume_and_writes_nowhere(tmp_path: Path) -> None:
    """A real run's last.ckpt edited to point TensorBoard elsewhere, or to carry a trainer key segplat does not
    know: `trainer.resume=auto` stops in one sentence and nothing appears outside the run folder."""
    from segplat.train import train
    from tests.engine.runs import QUICK

    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    common = [*QUICK, "logger=[jsonl,tensorboard]"]
    train(compose_train([*common, "trainer.max_epochs=1"], output_dir=run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    clean = torch.load(last, weights_only=True)
    assert clean["loggers"]["tensorboard"] == {"log_dir": str(run_dir / "tensorboard")}
    for edit, says in (
        (lambda s: s["loggers"]["tensorboard"].update(log_dir=str(elsewhere)), "as its TensorBoard folder"),
        (lambda s: s["trainer"].update(run_dir=str(elsewhere)), "holds trainer.run_dir, which this version"),
    ):
        state = {**clean, "loggers": {k: dict(v) for k, v in clean["loggers"].items()},
                 "trainer": dict(clean["trainer"])}
        edit(state)
        torch.save(state, last)
        with pytest.raises(CheckpointError, match=says) as err:
            train(compose_train([*common, "trainer.max_epochs=2", "trainer.resume=auto"], output_dir=run_dir))
        assert "\n" not in str(err.value)
        assert not elsewhere.exists()
    torch.save(clean, last)  # the untouched checkpoint resumes
    train(compose_train([*common, "trainer.max_epochs=2", "trainer.resume=auto"], output_dir=run_dir))
    assert torch.load(last, weights_only=True)["trainer"]["epoch"] == 2
