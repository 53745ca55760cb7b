"""The train task end to end: the CLI contract, the run folder, exact resume, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segplat.engine.checkpoint import load_checkpoint
from segplat.errors import CheckpointError, ConfigError, DataError
from segplat.train import train
from segplat.utils.task import user_error_in
from tests.conftest import TINY, compose_train


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "segplat.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_cli_run_writes_the_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "trainer.max_epochs=2", "callbacks.visuals.every_n_epochs=1", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("monitor", "best_score", "best_epoch", "miou", "per_class_iou", "pixel_accuracy"):
        assert key in summary, key
    assert set(summary["per_class_iou"]) == {"clear", "thick_cloud", "thin_cloud", "cloud_shadow"}
    assert summary["monitor"] == "val/miou" and summary["epochs_completed"] == 2
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert summary["best_score"] == max(r["val/miou"] for r in records)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    # plots: prediction panels per validation, curves and the confusion matrix at the end
    assert sorted(p.name for p in (run_dir / "visuals").glob("*.png")) == ["epoch_001.png", "epoch_002.png"]
    assert (run_dir / "curves.png").stat().st_size > 1000 and (run_dir / "confusion_matrix.png").is_file()
    # one console line of metrics per validation
    assert sum(line.startswith("epoch ") for line in proc.stdout.splitlines() + proc.stderr.splitlines()) == 2
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert state["trainer"]["epoch"] == 2 and state["data"]["classes"][2] == "thin_cloud"


@pytest.mark.slow
def test_train_returns_the_monitored_score(tmp_path: Path) -> None:
    cfg = compose_train([*TINY, "trainer.max_epochs=1", "callbacks.monitor=val/loss", "callbacks.mode=min"],
                        output_dir=tmp_path)
    score = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["monitor"] == "val/loss"
    assert score == pytest.approx(summary["best_score"]) and score == pytest.approx(summary["val_loss"])


@pytest.mark.slow
def test_channels_last_trains_the_same_model(tmp_path: Path) -> None:
    """trainer.channels_last takes effect (the model's weights are channels_last) and changes nothing but the memory
    layout: the same losses to float tolerance, the same checkpoint keys."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        train(compose_train([*TINY, "trainer.max_epochs=1", "callbacks.visuals=null", "callbacks.report=null",
                             f"trainer.channels_last={flag}"], output_dir=out))
        runs[flag] = (json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]),
                      load_checkpoint(out / "checkpoints" / "last.ckpt")["model"])
    (plain, plain_weights), (cl, cl_weights) = runs["false"], runs["true"]
    assert plain_weights.keys() == cl_weights.keys()
    conv = next(k for k, v in cl_weights.items() if v.ndim == 4)
    assert cl_weights[conv].is_contiguous(memory_format=torch.channels_last)
    assert not plain_weights[conv].is_contiguous(memory_format=torch.channels_last)
    assert cl["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-4)
    assert cl["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-4)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    """Uninterrupted 4 epochs == killed after epoch 2 (SIGKILL) + resumed to epoch 4, to 1e-6; the killed run's
    MLflow run is continued, with each metric step once."""
    store = tmp_path / "mlflow"
    common = [*TINY, "trainer.max_epochs=4", "callbacks.early_stopping=null", "logger=[jsonl,mlflow]",
              f"logger.mlflow.store_dir={store}"]
    straight = tmp_path / "straight"
    proc = run_cli([*common, f"hydra.run.dir={straight}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "segplat.train", *common, f"hydra.run.dir={killed}"], cwd=tmp_path,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and any(r["epoch"] == 2 for r in read_jsonl(metrics)):
            break
        if p.poll() is not None:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    ckpt = load_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert 1 <= ckpt["trainer"]["epoch"] <= 3

    proc = run_cli([*common, f"hydra.run.dir={killed}", "trainer.resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["epochs_completed"] == 4
    assert abs(a["miou"] - b["miou"]) < 1e-6 and abs(a["val_loss"] - b["val_loss"]) < 1e-6
    for k in a["per_class_iou"]:
        assert abs(a["per_class_iou"][k] - b["per_class_iou"][k]) < 1e-6
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2, 3, 4]
    wa = load_checkpoint(straight / "checkpoints" / "last.ckpt")["model"]
    wb = load_checkpoint(killed / "checkpoints" / "last.ckpt")["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segplat").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["killed", "straight"]
    run = next(r for r in runs if r.info.run_name == "killed")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")]
    assert sorted(steps) == [r["step"] for r in read_jsonl(killed / "metrics.jsonl")]  # each step once
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_missing_dataset_root_stops_at_once_with_a_hint(tmp_path: Path) -> None:
    """How fast it stops is benchmarks/cli_errors.py's measure, not an assertion here."""
    proc = run_cli(["model=cmx", "dataset=clouds", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    msg = proc.stderr.strip().splitlines()[-1]
    assert msg.startswith("error: dataset.root is not set") and "segplat.data.fake clouds" in msg
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, key", [
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("dataset.batch_size=-2", "dataset.batch_size"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.encoder_lr=-1e-4", "optimizer.encoder_lr"),
    ("dataset.patch_size=128", "dataset.patch_size"),
    ("fusion.level=sideways", "fusion.level"),
    ("callbacks.monitor=val/nonsense", "callbacks.monitor"),
    ("trainer.compile=sometimes", "trainer.compile"),
    ("trainer.channels_last=2", "trainer.channels_last"),
])
def test_bad_config_values_stop_with_one_sentence(override: str, key: str, tmp_path: Path) -> None:
    cfg = compose_train([*TINY, "trainer.max_epochs=1", override], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        train(cfg)
    assert str(err.value).count("\n") == 0
    assert not (tmp_path / "checkpoints").exists(), "nothing may be trained before the check"


@pytest.mark.slow
def test_unknown_option_lists_the_valid_ones(tmp_path: Path) -> None:
    proc = run_cli(["model=nosuchmodel", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "nosuchmodel" in proc.stderr and "unet" in proc.stderr  # Hydra lists the available options
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model=nosuchmodel is not an option of model")


@pytest.mark.slow
def test_a_near_miss_key_gets_a_did_you_mean(tmp_path: Path) -> None:
    proc = run_cli(["trainer.max_epoch=3", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Could not override 'trainer.max_epoch'" in proc.stderr  # Hydra's own message stays
    assert proc.stderr.strip().splitlines()[-1] == ("error: trainer.max_epoch is not a key of trainer; did you mean "
                                                    "trainer.max_epochs? (add keys on purpose with "
                                                    "+trainer.max_epoch=...)")
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_a_reused_run_folder_is_never_trained_into_from_scratch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_train([*TINY, "trainer.max_epochs=1", "callbacks.visuals=null"], output_dir=run))
    before = (run / "metrics.jsonl").read_text(), (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"already holds a run .* trainer\.resume=auto, choose a new run_name, or set "
                                          r"trainer\.overwrite=true"):
        train(compose_train([*TINY, "trainer.max_epochs=1"], output_dir=run))
    assert ((run / "metrics.jsonl").read_text(), (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns) == before
    # best.ckpt is what prediction and fine-tuning need; last.ckpt the full resume state
    best, last = load_checkpoint(run / "checkpoints" / "best.ckpt"), load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert "optimizer" not in best and {"model", "data", "config", "meta"} <= set(best) and "optimizer" in last
    assert (run / "checkpoints" / "best.ckpt").stat().st_size < (run / "checkpoints" / "last.ckpt").stat().st_size / 2
    train(compose_train([*TINY, "trainer.max_epochs=2", "trainer.overwrite=true", "callbacks.visuals=null"],
                        output_dir=run))
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_resume_auto_after_a_kill_during_the_first_save(tmp_path: Path) -> None:
    """The first save was killed: epoch 1 in metrics.jsonl, a temporary checkpoint file, no last.ckpt. resume=auto
    starts afresh without logging epoch 1 twice and removes the temporary file."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 2, "val/miou": 0.1}) + "\n")
    stale = run / "checkpoints" / ".last.ckpt.a1b2c3.tmp"
    stale.write_bytes(b"\0" * 1024)
    train(compose_train([*TINY, "trainer.max_epochs=1", "trainer.resume=auto", "callbacks.visuals=null"],
                        output_dir=run))
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert not stale.exists() and (run / "checkpoints" / "last.ckpt").is_file()


def test_resume_path_without_checkpoint_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    cfg = compose_train([*TINY, f"trainer.resume={empty}"], output_dir=tmp_path / "new")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train(cfg)


@pytest.mark.slow
def test_checkpoint_from_a_different_model_is_refused(tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(compose_train([*TINY, "trainer.max_epochs=1"], output_dir=first))
    cfg = compose_train([*[o for o in TINY if not o.startswith("model.encoder.name")], "model.encoder.name=resnet18",
                         "trainer.max_epochs=2", f"trainer.resume={first}"], output_dir=tmp_path / "second")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(cfg)
    cfg = compose_train([*TINY, "trainer.max_epochs=2", "fusion=mid", f"trainer.resume={first}"],
                        output_dir=tmp_path / "third")
    with pytest.raises(CheckpointError, match="fusion"):
        train(cfg)


@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_gradient_accumulation_makes_one_optimiser_step_per_group(tmp_path: Path) -> None:
    """Two micro-batches accumulate into one optimiser step (the weights' equality with a larger batch is
    tests/distributed/test_ddp.py's)."""
    a = compose_train([*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "dataset.batch_size=4",
                       "trainer.accumulate_grad_batches=2"], output_dir=tmp_path / "a")
    train(a)
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert state["trainer"]["global_step"] == 1, "two micro-batches make one optimiser step"


@pytest.mark.slow
def test_wandb_runs_offline_and_resume_keeps_its_run(tmp_path: Path) -> None:
    """The default logger writes an offline wandb run in the run folder; a resume continues that run."""
    run = tmp_path / "run"
    wandb_on = [o for o in TINY if o != "logger=none"] + ["logger=default"]
    train(compose_train([*wandb_on, "trainer.max_epochs=1"], output_dir=run))
    first = load_checkpoint(run / "checkpoints" / "last.ckpt")["loggers"]["wandb"]["run_id"]
    assert first and list((run / "wandb").glob(f"offline-run-*-{first}"))
    train(compose_train([*wandb_on, "trainer.max_epochs=2", "trainer.resume=auto"], output_dir=run))
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["loggers"]["wandb"]["run_id"] == first


def test_a_store_that_disagrees_with_its_layout_is_refused_before_training(tmp_path: Path, monkeypatch) -> None:
    """The model is built from the layout's description; a store whose modalities come in another order (or with
    other bands or classes) is refused in one sentence instead of feeding the model the wrong streams."""
    from segplat.data.datamodule import DataModule

    describe = DataModule.describe

    def reordered(self):
        info = describe(self)
        info.specs = dict(reversed(list(info.specs.items())))
        info.modalities = {m: len(s.bands) for m, s in info.specs.items()}
        return info

    monkeypatch.setattr(DataModule, "describe", reordered)
    out = tmp_path / "run"
    refusal = r"the store .* holds .* but the synthetic layout describes .*force=true"
    with pytest.raises(DataError, match=refusal) as err:
        train(compose_train([*TINY, "trainer.max_epochs=1", "fusion=mid"], output_dir=out))
    assert "\n" not in str(err.value)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("loss.aux_weights={f2: 0.5}", r"^loss\.aux_weights names \['f2'\], but model Segmenter returns no auxiliary "),
    ("callbacks.visuals.every_n_epochs=0", r"^callbacks\.visuals\.every_n_epochs=0 must be a positive integer; to "
                                           r"render no panels, set callbacks\.visuals=null\.$"),
    ("callbacks.early_stopping.patience=0", r"^callbacks\.early_stopping\.patience=0 must be a positive integer; "
                                            r"validations without improvement; to train every epoch"),
    # mode max on a loss kept the worst epoch as best, stopped early while it improved, swept the wrong way
    ("callbacks.monitor=val/loss", r"^callbacks\.monitor=val/loss falls as the model improves, but callbacks\.mode"
                                   r"=max: .* set callbacks\.mode=min\.$"),
    ("loss.terms.ce.label_smoothing=2", r"^loss\.terms\.ce\.label_smoothing=2 must be a number of at least 0 and "
                                        r"below 1\.$"),
])
def test_loss_and_callback_keys_are_checked_before_data(tmp_path: Path, override: str, message: str) -> None:
    """These were checked after the store was prepared (loss, callbacks), at the first step (aux weights of outputs
    the model lacks: never; 0 every_n_epochs / patience were taken as 1)."""
    stores = tmp_path / "stores"
    cfg = compose_train([*TINY, override, f"paths.store_dir={stores}"], tmp_path / "run")
    with pytest.raises(Exception) as err:  # Hydra wraps an error raised in a constructor; the CLI unwraps it
        train(cfg)
    assert re.match(message, str(user_error_in(err.value))), err.value
    assert not stores.exists() or not any(stores.iterdir())


def test_a_monitor_that_validation_never_logs_is_refused_before_data(tmp_path: Path) -> None:
    """It was refused after the store was prepared and one epoch trained (in a sweep: every trial)."""
    stores = tmp_path / "stores"
    cfg = compose_train([*TINY, "callbacks.monitor=val/iou_thin", f"paths.store_dir={stores}"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^callbacks\.monitor=val/iou_thin is not a metric validation logs; did "
                                          r"you mean val/iou_thin_cloud\? choose one of val/miou, "):
        train(cfg)
    assert not stores.exists() or not any(stores.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["callbacks=finetune", "callbacks.finetune.patience=null",
                                         "callbacks.finetune.unfreeze_epoch=10"]])
def test_resuming_an_early_stopped_run_trains_nothing_unless_patience_allows(tmp_path: Path, extra: list[str]) -> None:
    """A requeue that always passes trainer.resume=auto trained a finished run one more epoch. With a fine-tuning
    callback whose patience is null, the resume compared its patience (None) with an int."""
    run = tmp_path / "run"
    stop = ["trainer.max_epochs=4", "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1e9",
            "callbacks.visuals=null", *extra]
    train(compose_train([*TINY, *stop], run))

    def epochs() -> list[int]:
        return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert epochs() == [1, 2]
    train(compose_train([*TINY, *stop, "trainer.resume=auto"], run))
    assert epochs() == [1, 2] and json.loads((run / "summary.json").read_text())["status"] == "stopped_early"
    patient = [*stop[:1], "callbacks.early_stopping.patience=5", *stop[2:], "trainer.resume=auto"]
    train(compose_train([*TINY, *patient], run))
    assert epochs() == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_refused_command_leaves_no_run_folder(tmp_path: Path) -> None:
    """It left runs/<name>/ with .hydra/ and an empty train.log."""
    cmd = [sys.executable, "-m", "segplat.train", "debug=fast", f"paths.log_dir={tmp_path}", "run_name=refused",
           "callbacks.monitor=val/loss"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2 and "callbacks.mode=min" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "train" / "runs" / "refused").exists()
