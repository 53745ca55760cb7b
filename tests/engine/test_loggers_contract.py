"""The tracker contract (segplat/engine/loggers/base.py), one test run by every tracker: metrics.jsonl, MLflow (local
store), TensorBoard and wandb offline, each read back with its own reader.

- a resume continues the same tracker run, and a step logged before a kill and trained again after the resume is
  held once (the kill is simulated as a resumed process sees it: a second adapter starts from the checkpoint's
  tracker state without the first being finished);
- a tracker that fails during a real (tiny) training run is dropped with a warning and the run goes on; a required
  one (metrics.jsonl, which plots and resume read) stops the run instead.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from segplat.engine.loggers import JsonlLogger, MlflowLogger, RunInfo, TensorBoardLogger, Tracker, WandbLogger
from segplat.train import train
from tests.conftest import TINY, compose_train

MIOU = {4: 0.1, 8: 0.2, 12: 0.3, 16: 0.4}  # an exact resume computes the same value for a step trained again


@dataclass
class Probe:
    """How the contract test builds one tracker and reads back what it holds."""

    cls: type[Tracker]
    build: Callable[[Path], Tracker]
    identity: Callable[[Tracker], str]  # the tracker run it writes to
    history: Callable[[Path, Path], list[tuple[str, int, float]]]  # (tracker run, step, val/miou) as held
    overrides: Callable[[Path], list[str]]  # for a training run: select it, point it at the test folder
    settle: Callable[[], None] = lambda: None  # what the end of the process does for a tracker dropped unfinished


def jsonl_history(tmp: Path, run_dir: Path) -> list[tuple[str, int, float]]:
    path = run_dir / "metrics.jsonl"
    return [(str(path), r["step"], r["val/miou"]) for r in map(json.loads, path.read_text().splitlines())]


def mlflow_history(tmp: Path, run_dir: Path) -> list[tuple[str, int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'store' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("contract").experiment_id])
    return sorted((r.info.run_id, m.step, m.value) for r in runs for m in client.get_metric_history(r.info.run_id,
                                                                                                     "val/miou"))


def tensorboard_history(tmp: Path, run_dir: Path) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        if "val/miou" in acc.Tags()["scalars"]:
            rows += [(str(folder), e.step, e.value) for e in acc.Scalars("val/miou")]
    return rows


def wandb_records(path: Path) -> list[Any]:
    """The records of a `.wandb` file (wandb's LevelDB-log framing: a 7-byte file header, 32 KiB blocks, records of
    a 7-byte header `crc32, length, type` and payload, split across blocks as FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_history(tmp: Path, run_dir: Path) -> list[tuple[str, int, float]]:
    """Every offline segment of the run in the order written; a resumed segment's step at or below the run's last
    one is not logged again (wandb's rule for a resumed run)."""
    rows: list[tuple[str, int, float]] = []
    last: dict[str, int] = {}
    for segment in sorted((run_dir / "wandb").glob("offline-run-*")):
        # offline-run-<time>-<id>, or offline-run-<time>-<id>-<n> when a resume starts within the same second
        run_id = re.fullmatch(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)(-\d+)?", segment.name).group(1)
        for record in wandb_records(next(segment.glob("*.wandb"))):
            if record.WhichOneof("record_type") != "history":
                continue
            step = record.history.step.num
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            if "val/miou" in items and step > last.get(run_id, -1):
                rows.append((run_id, step, items["val/miou"]))
                last[run_id] = step
    return rows


PROBES = {
    "jsonl": Probe(JsonlLogger, lambda tmp: JsonlLogger(), lambda lg: str(lg.path), jsonl_history,
                   lambda tmp: ["logger=[jsonl]"]),
    "mlflow": Probe(MlflowLogger, lambda tmp: MlflowLogger(store_dir=str(tmp / "store"), experiment_name="contract",
                                                           log_model=False),
                    lambda lg: lg.run_id, mlflow_history,
                    lambda tmp: ["logger=[jsonl,mlflow]", f"logger.mlflow.store_dir={tmp / 'store'}",
                                 "logger.mlflow.experiment_name=contract", "logger.mlflow.log_model=false"]),
    "tensorboard": Probe(TensorBoardLogger, lambda tmp: TensorBoardLogger(), lambda lg: lg.log_dir,
                         tensorboard_history, lambda tmp: ["logger=[jsonl,tensorboard]"]),
    "wandb": Probe(WandbLogger, lambda tmp: WandbLogger(mode="offline", project="contract"), lambda lg: lg.run_id,
                   wandb_history, lambda tmp: ["logger=[jsonl,wandb]", "logger.wandb.project=contract"],
                   settle=lambda: __import__("wandb").finish()),
}


def info(run_dir: Path, state: dict[str, Any] | None = None) -> RunInfo:
    return RunInfo(run_dir, run_dir.name, {"seed": 1}, monitor="val/miou", resuming=state is not None,
                   resume_step=8 if state is not None else 0, resume_epoch=2 if state is not None else 0,
                   resume_state=state, overrides=[])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROBES))
def test_a_resume_continues_the_tracker_run_with_each_step_once(name: str, tmp_path: Path) -> None:
    probe = PROBES[name]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = probe.build(tmp_path)
    first.start(info(run_dir))
    first_run = probe.identity(first)
    for epoch, step in enumerate((4, 8, 12), start=1):
        first.log_metrics({"epoch": epoch, "step": step, "val/miou": MIOU[step]}, step)
        if step == 8:
            saved = first.state_dict()  # last.ckpt of epoch 2; epoch 3 is logged, then the process is killed
    second = probe.build(tmp_path)
    second.start(info(run_dir, saved))
    second_run = probe.identity(second)
    for epoch, step in ((3, 12), (4, 16)):
        second.log_metrics({"epoch": epoch, "step": step, "val/miou": MIOU[step]}, step)
    second.finish("completed")

    rows = probe.history(tmp_path, run_dir)
    assert {run for run, _, _ in rows} == {second_run} == {first_run}
    assert [(step, round(value, 6)) for _, step, value in rows] == sorted(MIOU.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROBES))
def test_a_failing_tracker_is_dropped_and_training_goes_on(name: str, tmp_path: Path, monkeypatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    probe = PROBES[name]
    real = probe.cls.log_metrics
    calls: list[int] = []

    def fails_after_the_first(self: Tracker, record: dict[str, Any], step: int) -> None:
        calls.append(step)
        if len(calls) > 1:
            raise ConnectionError("the tracking server went away")
        real(self, record, step)

    monkeypatch.setattr(probe.cls, "log_metrics", fails_after_the_first)
    run_dir = tmp_path / "run"
    cfg = compose_train([*(a for a in TINY if not a.startswith("logger=")), *probe.overrides(tmp_path),
                         "trainer.max_epochs=3", "callbacks.early_stopping=null"], output_dir=run_dir)
    if probe.cls.required:  # metrics.jsonl: resume and the plots read it
        with pytest.raises(ConnectionError):
            train(cfg)
        return
    with caplog.at_level(logging.WARNING, logger="segplat"):
        train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert [r["epoch"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    assert len(calls) == 2, "dropped after its failure: not called again"
    warned = [r.getMessage() for r in caplog.records if f"logger.{name} failed in log_metrics" in r.getMessage()]
    assert len(warned) == 1 and "the tracking server went away" in warned[0] and "goes on without it" in warned[0]
    probe.settle()
    assert [step for _, step, _ in probe.history(tmp_path, run_dir)] == calls[:1]  # what it held before failing
