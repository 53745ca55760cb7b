"""`--multirun sweep=NAME debug=fast`: a few trials, said in the log, in a study of their own (issue 31 item 5).
The trials are tests.sweep.fake_task (the sweeper, its space check and the study are real; nothing is trained)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from segplat.sweep.sweeper import DEBUG_TRIALS

pytestmark = pytest.mark.slow

SWEEP = """# @package _global_
defaults:
  - override /hydra/sweeper: segplat_optuna
hydra:
  sweeper:
    study_name: long
    n_trials: 40
    task_module: tests.sweep.fake_task
    params:
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
      optimizer.weight_decay: choice(0.0, 0.01)
"""


def test_debug_fast_caps_the_budget_in_a_study_of_its_own(tmp_path: Path) -> None:
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "long.yaml").write_text(SWEEP)
    sweep_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "segplat.train", "--multirun", "sweep=long", "debug=fast",
           f"hydra.searchpath=[file://{tmp_path}]", f"hydra.sweep.dir={sweep_dir}"]
    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    for runs in (1, 2):  # each debug sweep runs its few trials again
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
        assert done.returncode == 0, done.stderr[-3000:]
        log = done.stdout + done.stderr
        assert f"debug=fast: this sweep runs at most {DEBUG_TRIALS} trial(s) (hydra.sweeper.n_trials=40 is capped) " \
               "in the study 'long_debug'" in log
        assert optuna.get_all_study_names(storage) == ["long_debug"]  # the real study is not touched
        trials = optuna.load_study(study_name="long_debug", storage=storage).trials
        assert [t.state.name for t in trials] == ["COMPLETE"] * DEBUG_TRIALS * runs
    # a budget below the cap is kept, not raised to it (a wheel's debug sweep with n_trials=1 once ran 3 trials)
    done = subprocess.run([*cmd, "hydra.sweeper.n_trials=1"], capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "this sweep runs at most 1 trial(s) in the study 'long_debug'" in done.stdout + done.stderr
    assert len(optuna.load_study(study_name="long_debug", storage=storage).trials) == DEBUG_TRIALS * 2 + 1
    # the trials were debug runs: debug=fast reached each of them
    assert "debug=fast" in (sweep_dir / "trial_0000" / "command.txt").read_text().split()
