"""A trial's life in the sweeper without training: the cause of a failure in one line, trials that are asked
but not run, interrupted baselines, and failure messages that point at logs that exist."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from segplat.errors import ConfigError
from segplat.sweep import space as sp
from segplat.sweep.runner import first_error_line, run_trial
from segplat.sweep.study import INTERRUPTED_ATTR, NOT_RUN_ATTR, budget_used, make_storage
from segplat.sweep.sweeper import OptunaSweeper, SweepFailed, SweepInterrupted

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_cause_not_hydras_hint_from_a_failing_job(tmp_path: Path) -> None:
    res = run_trial(["+mode=raise"], tmp_path / "raise", ENV, module="tests.sweep.fake_hydra_task")
    assert res.returncode == 1 and "HYDRA_FULL_ERROR" in (tmp_path / "raise" / "stderr.log").read_text()
    assert res.error_line == "ValueError: the real cause"


def test_the_cause_of_a_composition_error(tmp_path: Path) -> None:
    res = run_trial(["no.such.key=1"], tmp_path / "compose", ENV, module="tests.sweep.fake_hydra_task")
    assert res.returncode == 1 and res.error_line == "Could not override 'no.such.key'."


def test_segplat_sentence_wins_over_progress_bars_and_warnings() -> None:
    text = ("prepare train:  10%|#    \rprepare train: 100%|##########\n/x.py:3: UserWarning: careful\n"
            "  warnings.warn(\nerror: dataset.root=/nowhere does not exist; set dataset.root.\n")
    assert first_error_line(text) == "dataset.root=/nowhere does not exist; set dataset.root."
    assert first_error_line("Killed\n") == "Killed"


def sweeper_with_study(tmp_path: Path, params: dict, baselines: list[dict] | None = None,
                       **kwargs) -> tuple[OptunaSweeper, optuna.Study, list[sp.Param]]:
    sweeper = OptunaSweeper(study_name="t", params=params, baselines=baselines or [], heartbeat_interval=None,
                            task_module="tests.sweep.fake_task", env={"PYTHONPATH": str(REPO)}, **kwargs)
    sweeper.config = OmegaConf.create({"fusion": {"level": "mid"}, "logger": {}})
    parsed = sp.parse_params(params)
    sweeper.storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="t", storage=sweeper.storage)
    for i, fixed in enumerate(baselines or []):
        study.enqueue_trial(fixed, user_attrs={"baseline": i})
    return sweeper, study, parsed


def test_a_trial_asked_and_not_run_is_failed_at_once_and_its_baseline_requeued(tmp_path: Path) -> None:
    # a condition on a key the config lacks only shows when the trial is drawn (the space check stops it
    # before any trial in a real sweep); whatever stops a trial before it runs must not leave it RUNNING
    params = {"x": "choice(1, 2)", "y": {"when": {"no.such": 1}, "values": "choice(3, 4)"}}
    sweeper, study, parsed = sweeper_with_study(tmp_path, params, baselines=[{"x": 2}])
    with pytest.raises(ConfigError, match=r"no\.such"):
        sweeper.run_one(study, study.ask(), [], parsed, tmp_path, {}, False, "w", [("best_score", "maximize")])
    first, requeued = study.get_trials(deepcopy=False)
    assert first.state == TrialState.FAIL and first.user_attrs[NOT_RUN_ATTR]
    assert "no.such" in first.user_attrs["error"]
    assert budget_used(study) == 0, "a trial that never ran must not spend the budget"
    assert requeued.state == TrialState.WAITING and requeued.user_attrs["baseline"] == 0
    assert requeued.system_attrs["fixed_params"] == {"x": 2}
    assert not (tmp_path / "trial_0000").exists()


@pytest.mark.slow
def test_a_sigterm_during_a_baseline_trial_requeues_the_baseline(tmp_path: Path) -> None:
    sweeper, study, parsed = sweeper_with_study(tmp_path, {"x": "choice(1, 2)"}, baselines=[{"x": 1}, {"x": 2}])
    old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SweepInterrupted()))
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(SweepInterrupted):  # "sleep" keeps the fake trial running until it is stopped
            sweeper.run_one(study, study.ask(), ["sleep"], parsed, tmp_path, {}, False, "w",
                            [("best_score", "maximize")])
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, old)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    assert trials[0].user_attrs[INTERRUPTED_ATTR] and budget_used(study) == 0
    assert trials[2].user_attrs["baseline"] == 0 and trials[2].system_attrs["fixed_params"] == {"x": 1}
    # the next trials run the other baseline, then the interrupted one again
    assert [study.ask().number, study.ask().number] == [1, 2]


def test_the_failure_limit_points_at_a_log_that_exists(tmp_path: Path) -> None:
    sweeper, study, parsed = sweeper_with_study(tmp_path, {"x": "choice(1, 2)"}, max_failure_rate=0.0)
    res = sweeper.run_one(study, study.ask(), ["crash"], parsed, tmp_path, {}, False, "w",
                          [("best_score", "maximize")])
    assert res["state"] == "FAIL" and res["error"].startswith("exit code 2: dataset.root=/nowhere does not exist")
    with pytest.raises(SweepFailed, match=str(tmp_path / "trial_0000" / "stderr.log")):
        sweeper.check_failure_rate(study, tmp_path)
    # a failed trial without a run folder (another worker's, lost with its disk): name its recorded error
    lost = study.ask()
    lost.set_user_attr("run_dir", str(tmp_path / "elsewhere"))
    lost.set_user_attr("error", "exit code -9: Killed")
    study.tell(lost, state=TrialState.FAIL)
    with pytest.raises(SweepFailed) as err:
        sweeper.check_failure_rate(study, tmp_path)
    assert "Killed" in str(err.value) and "elsewhere" not in str(err.value)


def test_a_plain_command_line_value_fixes_a_searched_key() -> None:
    sweeper = OptunaSweeper(params={"optimizer.lr": "choice(0.1, 0.01)", "seed": "choice(1, 2)"})
    sweeper.config = OmegaConf.create({})
    fixed, swept = sweeper.split_arguments(["optimizer.lr=0.5", "seed=choice(3,4)", "trainer.max_epochs=2"])
    assert fixed == ["trainer.max_epochs=2"] and swept == {"optimizer.lr": "0.5", "seed": "choice(3,4)"}
    params = {p.key: p for p in sp.parse_params({**sweeper.params_spec, **swept})}
    assert params["optimizer.lr"].distribution is None and params["optimizer.lr"].fixed == 0.5


def test_fixed_and_conditional_fixed_values_reach_the_trial(tmp_path: Path) -> None:
    params = {"x": "choice(1, 2)", "trainer.max_epochs": 3, "y": {"when": {"x": 1}, "values": 5}}
    sweeper, study, parsed = sweeper_with_study(tmp_path, params, baselines=[{"x": 1}, {"x": 2}])
    for _ in range(2):
        res = sweeper.run_one(study, study.ask(), ["ok"], parsed, tmp_path, {}, False, "w",
                              [("best_score", "maximize")])
        assert res["state"] == "COMPLETE"
    first, second = (t.user_attrs["overrides"] for t in study.get_trials(deepcopy=False))
    assert first == ["ok", "x=1", "trainer.max_epochs=3", "y=5"]
    assert second == ["ok", "x=2", "trainer.max_epochs=3"]
    assert (tmp_path / "trial_0001" / "command.txt").read_text().split()[3:6] == second


def test_each_trial_knows_its_study_and_number(tmp_path: Path) -> None:
    """Trackers tag a trial's run with the study and trial number, whatever the pruner (issue 16)."""
    sweeper, study, parsed = sweeper_with_study(tmp_path, {"x": "choice(1, 2)"})
    for _ in range(2):
        sweeper.run_one(study, study.ask(), ["ok"], parsed, tmp_path, {"PYTHONPATH": str(REPO)}, False, "w",
                        [("best_score", "maximize")])
    for number in (0, 1):
        facts = json.loads((tmp_path / f"trial_{number:04d}" / "summary.json").read_text())["env"]
        assert facts == {"SEGPLAT_STUDY_NAME": "t", "SEGPLAT_TRIAL_NUMBER": str(number)}


DYING_WORKER = """
import sys
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from segplat.sweep import space as sp
from segplat.sweep.heartbeat import this_worker
from segplat.sweep.study import make_storage
from segplat.sweep.sweeper import OptunaSweeper

url, folder, repo = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
sweeper = OptunaSweeper(study_name="dead", params={"x": "choice(sleep)"}, heartbeat_interval=1, grace_period=2,
                        task_module="tests.sweep.fake_task", env={"PYTHONPATH": repo})
sweeper.config = OmegaConf.create({"logger": {}})
sweeper.storage = make_storage(url, 1, 2)
study = optuna.load_study(study_name="dead", storage=sweeper.storage)
sweeper.run_one(study, study.ask(), [], sp.parse_params(sweeper.params_spec), folder, {"PYTHONPATH": repo}, False,
                this_worker(), [("best_score", "maximize")])
"""


@pytest.mark.slow
def test_a_trial_whose_worker_was_killed_records_why(tmp_path: Path) -> None:
    """SIGKILL a sweeper while its trial runs: the trial dies with it, and the next worker FAILs the trial with the
    reason, the dead worker's host and pid, and its own name; the retried copy does not inherit the reason."""
    import socket
    import subprocess
    import sys
    import time
    import warnings

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="dead", storage=make_storage(url))
    worker = subprocess.Popen([sys.executable, "-c", DYING_WORKER, url, str(tmp_path), str(REPO)],
                              env={**os.environ, **ENV})
    run_dir = tmp_path / "trial_0000"
    deadline = time.monotonic() + 60
    while not (run_dir / "command.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    worker.kill()
    worker.wait(timeout=10)

    def trial_alive() -> bool:
        found = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
        return bool(found.stdout.strip())

    deadline = time.monotonic() + 10
    while trial_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not trial_alive(), "the trial must die with its sweeper"
    time.sleep(2.5)  # past the grace period since the last heartbeat
    storage = make_storage(url, heartbeat_interval=1, grace_period=2, retry_failed=1)
    study = optuna.load_study(study_name="dead", storage=storage)
    optuna.storages.fail_stale_trials(study)
    failed, retried = study.get_trials(deepcopy=False)
    assert failed.state == TrialState.FAIL
    attrs = failed.user_attrs
    assert attrs["reason"] == "heartbeat lost"
    assert (attrs["worker_host"], attrs["worker_pid"]) == (socket.gethostname(), worker.pid)
    assert attrs["failed_by"] == f"{socket.gethostname()}:{os.getpid()}"
    assert attrs["error"].startswith(f"heartbeat lost: its worker {socket.gethostname()}:{worker.pid} sent no "
                                     "heartbeat for over 2 s")
    assert retried.state == TrialState.WAITING and "reason" not in retried.user_attrs
    # the annotation is the callback's alone: the finished trial still refuses other writes
    with pytest.raises(RuntimeError, match="already finished"):
        storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name("dead"), 0), "late", 1)
