"""A NaN or infinite loss stops the run in one sentence and keeps the last finite checkpoint
(`trainer.nonfinite=stop`), or its optimiser step is skipped and counted (`trainer.nonfinite=skip`); a sweep trial
that stops this way is FAILED with that sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from segplat.engine.checkpoint import load_checkpoint
from segplat.engine.trainer import NonFiniteLoss, Trainer
from segplat.errors import ConfigError
from segplat.schema import check_targets
from segplat.train import train
from tests.conftest import compose_train
from tests.engine.runs import QUICK, records, run_cli, summary

SPIKE = ["+loss.terms.spike._target_=tests.engine.spike.Spike", "+loss.weights.spike=1.0"]


def spike_at(*calls: int, value: str = "nan") -> list[str]:
    """The Spike term, non-finite at these training micro-batches (4 per epoch: call 5 is epoch 2, batch 2)."""
    return [*SPIKE, f"+loss.terms.spike.at=[{','.join(map(str, calls))}]", f"+loss.terms.spike.value={value}"]


@pytest.mark.slow
def test_lr_1e9_stops_at_the_first_non_finite_loss_in_one_sentence(tmp_path: Path) -> None:
    """Issue 31: `optimizer.lr=1e9` trained to the end with no word."""
    run_dir = tmp_path / "run"
    proc = run_cli([*QUICK, "optimizer.lr=1e9", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the loss became non-finite in epoch ")
    for part in ("at batch", "optimiser step", "(ce ", "learning rates encoder 5e+08", "trainer.nonfinite=skip"):
        assert part in line, (part, line)
    s = summary(run_dir)
    assert s["status"] == "nonfinite_loss" and s["stopped_reason"] == line[len("error: "):]
    assert line in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_stop_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    """NaN at epoch 2's second batch: the run stops there; last.ckpt and best.ckpt stay epoch 1's, finite."""
    cfg = compose_train([*QUICK, "trainer.max_epochs=3", *spike_at(5)], output_dir=tmp_path)
    with pytest.raises(NonFiniteLoss) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("the loss became non-finite in epoch 2 at batch 2/4 (optimiser step 6): loss nan (ce ")
    assert "spike nan" in message and "checkpoints/last.ckpt keeps epoch 1, the last finite state" in message
    assert "\n" not in message
    last, best = (load_checkpoint(tmp_path / "checkpoints" / name) for name in ("last.ckpt", "best.ckpt"))
    assert last["trainer"]["epoch"] == 1 and best["trainer"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    s = summary(tmp_path)
    assert s["status"] == "nonfinite_loss" and s["stopped_reason"] == message and s["checkpoint_epoch"] == 1
    assert [r["epoch"] for r in records(tmp_path)] == [1]


@pytest.mark.slow
def test_weights_broken_behind_a_finite_loss_are_never_saved(tmp_path: Path) -> None:
    cfg = compose_train([*QUICK, "trainer.max_epochs=3", "+callbacks.poison._target_=tests.engine.spike.BreakWeights",
                         "+callbacks.poison.epoch=2"], output_dir=tmp_path)
    with pytest.raises(NonFiniteLoss, match="the weights became non-finite by the end of epoch 2") as err:
        train(cfg)
    assert "checkpoints/last.ckpt keeps epoch 1" in str(err.value)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["trainer"]["epoch"] == 1
    assert summary(tmp_path)["status"] == "nonfinite_loss"


@pytest.mark.slow
def test_skip_drops_those_steps_counts_them_and_trains_on(tmp_path: Path) -> None:
    """Two NaN micro-batches (epochs 1 and 3) are skipped: had their NaN gradients reached the weights, every later
    loss would be NaN too (and more steps skipped). The schedule keeps its length (global_step counts them)."""
    cfg = compose_train([*QUICK, "trainer.max_epochs=3", "trainer.nonfinite=skip", *spike_at(1, 9, value="inf")],
                        output_dir=tmp_path)
    train(cfg)
    s = summary(tmp_path)
    assert s["status"] == "completed" and s["nonfinite_skipped"] == 2 and s["global_step"] == 12
    recs = records(tmp_path)
    assert [r["train/nonfinite_skipped"] for r in recs] == [1, 0, 1]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["val/loss"]) for r in recs)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["trainer"]["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_skip_stops_when_a_whole_epoch_is_skipped(tmp_path: Path) -> None:
    cfg = compose_train([*QUICK, "trainer.max_epochs=3", "trainer.nonfinite=skip", *spike_at(4, 5, 6, 7)],
                        output_dir=tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"every optimiser step of epoch 2 \(4\) had a non-finite loss"):
        train(cfg)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["trainer"]["epoch"] == 1


def test_nonfinite_key_is_typed() -> None:
    with pytest.raises(ConfigError, match=r"trainer.nonfinite=ignore is not known.*stop or skip"):
        check_targets(compose_train(["trainer.nonfinite=ignore"]))
    assert Trainer(cpu=True, nonfinite="skip").nonfinite == "skip"


@pytest.mark.slow
def test_a_sweep_trial_stopped_by_a_non_finite_loss_is_failed_with_the_sentence(tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState

    root = tmp_path / "root"
    (root / "sweep").mkdir(parents=True)
    (root / "sweep" / "ruinous.yaml").write_text("""# @package _global_
defaults:
  - override /hydra/sweeper: segplat_optuna
trainer:
  max_epochs: 1
hydra:
  sweeper:
    study_name: ruinous
    n_trials: 1
    max_failure_rate: 1.0
    pruner: {name: none}
    params:
      optimizer.lr: choice(1.0e9, 2.0e9)
    baselines:
      - {optimizer.lr: 1.0e9}
""")
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["--multirun", "sweep=ruinous", f"hydra.searchpath=[file://{root}]", f"hydra.sweep.dir={sweep_dir}",
                    *QUICK, "trainer=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = optuna.load_study(study_name="ruinous", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["status"] == "nonfinite_loss"
    error = trial.user_attrs["error"].splitlines()[0]
    assert error.startswith("status nonfinite_loss: the loss became non-finite in epoch 1 at batch "), error
    assert "learning rates" in error
    s = json.loads((sweep_dir / "trial_0000" / "summary.json").read_text())
    assert error.endswith(s["stopped_reason"])
