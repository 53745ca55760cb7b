"""EncoderFineTuning (switch at the right validation, the encoder's group and its resume) and the
monitored metric of checkpointing / early stopping (val/loss min, val/iou_<class> max)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, ClassVar

import pytest
import torch

from segplat.engine.callbacks import Callback
from segplat.engine.checkpoint import load_checkpoint
from segplat.engine.finetune import EncoderFineTuning, inner_optimizer
from segplat.engine.trainer import StopTraining
from segplat.errors import ConfigError
from segplat.schema import check_targets
from segplat.train import train
from segplat.utils.task import user_error_in
from tests.conftest import TINY, compose_train

FAST = [*TINY, "trainer=cpu", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]


class Probe(Callback):
    """Records, at each epoch end, what the encoder and the optimiser look like; may stop the run."""

    name = "probe"
    order = 200  # after the checkpoint callback
    log: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after

    def on_train_epoch_end(self, trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        enc = [p for _, p in model.grouped_parameters()["encoder"]]
        opt = inner_optimizer(trainer)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        Probe.log.append({"epoch": trainer.state.epoch, "step": trainer.state.global_step,
                          "enc_sum": float(sum(p.detach().double().sum() for p in enc)),
                          "enc_grad": all(p.requires_grad for p in enc),
                          "enc_in_opt": all(id(p) in in_opt for p in enc),
                          "enc_state": all(id(p) in {id(q) for q in opt.state} for p in enc),
                          "lrs": {g["name"]: g["lr"] for g in opt.param_groups}})

    def on_validation_end(self, trainer, metrics) -> None:
        if self.stop_after is not None and trainer.state.epoch >= self.stop_after:
            raise StopTraining("probe stop", "stopped")


def records(run_dir) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def poly(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return 1e-6 + (1 - 1e-6) * step / warmup
    return min_ratio + (1 - min_ratio) * (1 - (step - warmup) / (total - warmup)) ** 0.9


@pytest.mark.slow
def test_switch_after_patience_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    # min_delta huge: only the first validation "improves", so patience=1 switches at validation 2
    overrides = [*FAST, "trainer.max_epochs=4", "callbacks=finetune", "callbacks.finetune.patience=1",
                        "callbacks.finetune.min_delta=1e9", "callbacks.finetune.lr_factor=0.1", "optimizer.lr=1e-3",
                        "scheduler.min_lr_ratio=0.05", "+callbacks.probe._target_=tests.test_finetune.Probe",
                        "+callbacks.probe.stop_after=3"]
    Probe.log.clear()
    train(compose_train(overrides, output_dir=run_dir))
    log = list(Probe.log)
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert not log[0]["enc_grad"] and not log[0]["enc_in_opt"] and not log[1]["enc_in_opt"]
    assert log[0]["enc_sum"] == log[1]["enc_sum"]  # frozen: not a single change in 2 epochs
    assert log[2]["enc_grad"] and log[2]["enc_in_opt"] and log[2]["enc_state"]
    assert log[2]["enc_sum"] != log[1]["enc_sum"]  # trained in epoch 3
    assert "encoder" not in log[1]["lrs"] and {"encoder", "encoder_no_decay"} <= set(log[2]["lrs"])
    recs = records(run_dir)
    assert ["lr/encoder" in r for r in recs] == [False, False, True]
    total, warmup = 8, 2  # 2 steps per epoch, 4 epochs, warmup 1 epoch
    assert recs[2]["lr/encoder"] == pytest.approx(1e-4 * poly(6, total, warmup, 0.05), rel=1e-9)
    assert recs[2]["lr/decoder"] == pytest.approx(1e-3 * poly(6, total, warmup, 0.05), rel=1e-9)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["callbacks"]["finetune"]["switched"] and ckpt["callbacks"]["finetune"]["switch_epoch"] == 2

    # resume after the switch: the encoder's groups come back before the optimiser state is loaded
    Probe.log.clear()
    resumed = [*overrides[:-1], "+callbacks.probe.stop_after=null", "trainer.resume=auto"]
    train(compose_train(resumed, output_dir=run_dir))
    assert [e["epoch"] for e in Probe.log] == [4]
    assert Probe.log[0]["enc_grad"] and Probe.log[0]["enc_in_opt"] and Probe.log[0]["enc_state"]
    assert Probe.log[0]["enc_sum"] != log[2]["enc_sum"]
    recs = records(run_dir)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert recs[3]["lr/encoder"] == pytest.approx(1e-4 * poly(8, total, warmup, 0.05), rel=1e-9)
    assert recs[3]["lr/decoder"] == pytest.approx(1e-3 * poly(8, total, warmup, 0.05), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["callbacks.finetune.encoder_lr", "optimizer.encoder_lr"])
def test_switch_at_unfreeze_epoch_with_encoder_lr(tmp_path, key):
    """Either key sets the unfrozen encoder's rate (optimizer.encoder_lr was ignored: lr_factor x head won)."""
    Probe.log.clear()
    train(compose_train([*FAST, "trainer.max_epochs=2", "callbacks=finetune", "callbacks.finetune.patience=null",
                                "callbacks.finetune.unfreeze_epoch=2", f"{key}=2e-5",
                                "scheduler=cosine", "+callbacks.probe._target_=tests.test_finetune.Probe"],
                        output_dir=tmp_path / "run"))
    assert [e["enc_in_opt"] for e in Probe.log] == [False, True]
    cfg_lr = Probe.log[1]["lrs"]
    assert cfg_lr["encoder"] / 2e-5 == pytest.approx(cfg_lr["decoder"] / 2e-3, rel=1e-9)  # same cosine factor


@pytest.mark.slow
def test_the_switch_is_printed_once_and_kept_in_the_run_log(tmp_path):
    cmd = [sys.executable, "-m", "segplat.train", "debug=fast", "callbacks=finetune", "trainer.max_epochs=2",
           "callbacks.finetune.unfreeze_epoch=2", f"paths.log_dir={tmp_path}", "run_name=ft"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    said = "fine-tuning: encoder unfrozen after epoch 1 (unfreeze_epoch=2)"
    assert (res.stdout + res.stderr).count(said) == 1, res.stdout
    (log,) = tmp_path.rglob("train.log")
    assert log.read_text().count(said) == 1


class NormProbe(Callback):
    """The frozen encoder's BatchNorm running means, summed, at each epoch end."""

    name = "norm_probe"
    log: ClassVar[list[float]] = []

    def on_train_epoch_end(self, trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        NormProbe.log.append(sum(float(m.running_mean.double().sum()) for n, m in model.named_modules()
                                 if isinstance(m, torch.nn.BatchNorm2d) and model.param_group(n) == "encoder"))


@pytest.mark.slow  # over a second: in the full run, not the local loop
@pytest.mark.parametrize("train_bn", [True, False])
def test_train_bn_false_keeps_the_frozen_encoders_norm_statistics(tmp_path, train_bn):
    """Frozen meant no gradient only: the BatchNorm statistics of a pretrained encoder drifted while frozen."""
    NormProbe.log.clear()
    train(compose_train([*FAST, "trainer.max_epochs=3", "callbacks=finetune", "callbacks.finetune.patience=null",
                         "callbacks.finetune.unfreeze_epoch=3", f"callbacks.finetune.train_bn={train_bn}",
                         "+callbacks.norm_probe._target_=tests.test_finetune.NormProbe"], output_dir=tmp_path / "r"))
    first, second, third = NormProbe.log
    assert (first != second) is train_bn  # epochs 1-2 frozen: unchanged only with train_bn=false
    assert second != third  # epoch 3 trains the encoder: its statistics follow the data either way


def test_train_bn_false_on_an_encoder_without_batch_norm_is_refused(tmp_path):
    """A MiT encoder has only LayerNorms: train_bn=false would have done nothing."""
    no_unet = [o for o in FAST if not o.startswith("model.")]
    cfg = compose_train([*no_unet, "model=segformer", "model.backbone=mit_b0", "callbacks=finetune",
                         "callbacks.finetune.train_bn=false"], output_dir=tmp_path / "r")
    with pytest.raises(Exception) as err:
        train(cfg)
    assert "callbacks.finetune.train_bn=false keeps batch-norm statistics, but the encoder group has no BatchNorm" \
        in str(user_error_in(err.value))


def test_finetune_config_errors():
    with pytest.raises(ConfigError, match="patience or unfreeze_epoch"):
        EncoderFineTuning(patience=None, unfreeze_epoch=None)
    node = {"_target_": "segplat.engine.finetune.EncoderFineTuning", "lr_factor": 0}
    with pytest.raises(ConfigError, match=r"^callbacks.finetune.lr_factor=0 must be a positive number\.$"):
        check_targets(node, root="callbacks.finetune")


@pytest.mark.parametrize("monitor,mode", [("val/loss", "min"), ("val/iou_thin_cloud", "max")])
@pytest.mark.slow
def test_monitor_any_validation_metric(tmp_path, monitor, mode):
    run_dir = tmp_path / "run"
    # min_delta huge: early stopping fires at the second validation whatever the values
    train(compose_train([*FAST, "trainer.max_epochs=3", f"callbacks.monitor={monitor}", f"callbacks.mode={mode}",
                                "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1e9"],
                        output_dir=run_dir))
    recs = records(run_dir)
    assert [r["epoch"] for r in recs] == [1, 2]
    values = [r[monitor] for r in recs]
    pick = min if mode == "min" else max
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped_early" and monitor in summary["stopped_reason"]
    assert summary["best_score"] == pytest.approx(pick(values))
    assert summary["best_epoch"] == 1 + values.index(pick(values))
    best = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert best["trainer"]["epoch"] == summary["best_epoch"]
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["callbacks"]["early_stopping"]["wait"] == 1  # saved after early stopping's update
    assert torch.is_tensor(next(iter(last["model"].values())))
