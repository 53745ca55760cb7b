"""Several trials at once from one sweeper (`hydra.sweeper.n_jobs=K`): each on its own devices and share of the
CPU threads, with the budget, heartbeats, pruning and failure rules of one trial at a time. Trials are the fake
task (tests/sweep/fake_task.py), which records the environment it was started with."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.segplat_sweeper.segplat_optuna_sweeper import SegplatOptunaSweeper
from segplat.errors import ConfigError
from segplat.sweep import space as sp
from segplat.sweep.slots import cpu_count, slot_envs
from segplat.sweep.study import budget_used, make_storage
from segplat.sweep.sweeper import OptunaSweeper, SweepFailed

REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)
OBJECTIVE = [("best_score", "maximize")]


def test_slots_deal_devices_round_robin_and_divide_the_threads() -> None:
    threads = str(max(1, cpu_count() // 2))
    a, b = slot_envs(2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert (a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"]) == ("0,2", "1,3")
    assert a["OMP_NUM_THREADS"] == b["MKL_NUM_THREADS"] == threads
    with pytest.raises(ConfigError) as err:
        slot_envs(3, {"CUDA_VISIBLE_DEVICES": "4,5"})
    text = str(err.value)
    assert text.startswith("hydra.sweeper.n_jobs=3 is more trials at once than the 2 device(s)") and "\n" not in text
    assert "hydra.sweeper.share_devices=true" in text
    shared = slot_envs(3, {"CUDA_VISIBLE_DEVICES": "4,5"}, share_devices=True)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in shared] == ["4", "5", "4"]
    # the user's own thread count wins; one slot changes nothing; no devices: threads only
    assert "OMP_NUM_THREADS" not in slot_envs(2, {"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": ""})[0]
    assert slot_envs(1, {"CUDA_VISIBLE_DEVICES": "0,1"}) == [{}]
    assert "CUDA_VISIBLE_DEVICES" not in slot_envs(2, {"CUDA_VISIBLE_DEVICES": ""})[1]


def test_bad_values_are_one_sentence_when_the_sweep_starts(capsys: pytest.CaptureFixture) -> None:
    for kwargs, message in (({"n_jobs": 0}, "hydra.sweeper.n_jobs=0 must be a positive integer."),
                            ({"n_jobs": 2.5}, "hydra.sweeper.n_jobs=2.5 must be a positive integer."),
                            ({"n_job": 2}, "hydra.sweeper.n_job is not a key of hydra.sweeper; did you mean "
                                           "hydra.sweeper.n_jobs?")):
        plugin = SegplatOptunaSweeper(**kwargs)
        with pytest.raises(SystemExit) as stop:
            plugin.sweep([])
        assert stop.value.code == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def _sweeper(tmp_path: Path, n_trials: int, baselines: list[str], **kwargs) -> tuple[OptunaSweeper, optuna.Study]:
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    sweeper = OptunaSweeper(study_name="k", params={"x": "choice(nap, crash, pruned, ok)"}, n_trials=n_trials,
                            heartbeat_interval=1, grace_period=2, task_module="tests.sweep.fake_task",
                            env={"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, **kwargs)
    sweeper.config = OmegaConf.create({"logger": {}})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    sweeper.storage = make_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="k", storage=sweeper.storage)
    for mode in baselines:
        study.enqueue_trial({"x": mode})
    return sweeper, study


def _run(sweeper: OptunaSweeper, study: optuna.Study, tmp_path: Path) -> list[dict]:
    slots = slot_envs(sweeper.n_jobs, sweeper.env)
    params = sp.parse_params(sweeper.params_spec)
    return sweeper.run_trials(study, None, slots, [], params, tmp_path, dict(sweeper.env), False, "w", OBJECTIVE)


@pytest.mark.slow
def test_two_trials_at_once_keep_budget_heartbeats_and_outcomes(tmp_path: Path) -> None:
    sweeper, study = _sweeper(tmp_path, 5, ["nap", "nap", "crash", "pruned", "nap"], n_jobs=2, max_failure_rate=1.0)
    # another worker looks for dead trials all along: a trial whose heartbeat lapses (grace 2 s < a nap) is failed
    watcher = optuna.load_study(study_name="k", storage=make_storage(f"sqlite:///{tmp_path / 'study.db'}", 1, 2))
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.3):
            optuna.storages.fail_stale_trials(watcher)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        results = _run(sweeper, study, tmp_path)
    finally:
        done.set()
        thread.join()
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.PRUNED, TrialState.COMPLETE]
    assert len(results) == 5 and budget_used(study) == 5, "the budget is exact with two trials at once"
    assert trials[2].user_attrs["reason"] == "exit code 2" and "dataset.root" in trials[2].user_attrs["error"]
    summaries = {t.number: json.loads((tmp_path / f"trial_{t.number:04d}" / "summary.json").read_text())
                 for t in trials if t.state != TrialState.FAIL}
    first, second = summaries[0], summaries[1]
    assert second["started"] < first["ended"] and first["started"] < second["ended"], "the naps overlapped"
    # each trial saw its slot's devices and threads, and the study records them
    assert {first["slot"]["CUDA_VISIBLE_DEVICES"], second["slot"]["CUDA_VISIBLE_DEVICES"]} == {"0,2", "1,3"}
    for number, summary in summaries.items():
        assert summary["slot"]["CUDA_VISIBLE_DEVICES"] == trials[number].user_attrs["devices"]
        assert summary["slot"]["OMP_NUM_THREADS"] == str(max(1, cpu_count() // 2))
    # trials that ran at the same time never shared a device
    for a in summaries:
        for b in summaries:
            sa, sb = summaries[a], summaries[b]
            if a < b and sa["started"] < sb["ended"] and sb["started"] < sa["ended"]:
                assert not set(sa["slot"]["CUDA_VISIBLE_DEVICES"].split(",")) & \
                    set(sb["slot"]["CUDA_VISIBLE_DEVICES"].split(",")), (a, b)


@pytest.mark.slow
def test_past_the_failure_limit_no_trial_starts_and_running_ones_end(tmp_path: Path) -> None:
    sweeper, study = _sweeper(tmp_path, 6, ["crash", "nap", "nap", "nap"], n_jobs=2, max_failure_rate=0.0)
    with pytest.raises(SweepFailed, match=r"hydra\.sweeper\.max_failure_rate=0\.0"):
        _run(sweeper, study, tmp_path)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    # the crash stops the sweep; the nap beside it is finished and recorded, nothing else was asked
    assert states[:2] == [TrialState.FAIL, TrialState.COMPLETE] and TrialState.RUNNING not in states
    assert budget_used(study) == 2
