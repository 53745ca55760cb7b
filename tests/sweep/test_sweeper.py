"""End-to-end sweeps through the CLI (`python -m segplat.train --multirun sweep=...`) on tiny synthetic data.

Each test sweep file lives in a temporary search-path root (`sweep/<name>.yaml`); the sweeper forwards
`hydra.searchpath` to its trials. Trials are real subprocesses training a tiny U-Net for 1-2 epochs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import TINY, compose_train

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)

HEAD = """# @package _global_
defaults:
  - override /hydra/sweeper: segplat_optuna
callbacks:
  early_stopping: null
trainer:
  max_epochs: 1
"""


def with_sampler(option: str) -> str:
    """HEAD choosing an option of the hydra/sweeper/sampler group."""
    return HEAD.replace("segplat_optuna\n", f"segplat_optuna\n  - override /hydra/sweeper/sampler: {option}\n")


SWEEPS = {
    "tiny": HEAD + """hydra:
  sweeper:
    study_name: tiny
    n_trials: 4
    heartbeat_interval: 5
    sampler: {seed: 0}
    pruner: {name: none}
    params:
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
      optimizer.weight_decay: choice(0.0, 0.01)
    baselines:
      - {optimizer.lr: 2.0e-3, optimizer.weight_decay: 0.0}
      - {optimizer.lr: 1.0e-3}
      - {optimizer.lr: 5.0e-3, optimizer.weight_decay: 0.01}
""",
    # a good baseline runs to the end; a trial with a vanishing learning rate is pruned at its first report
    "prune": HEAD.replace("max_epochs: 1", "max_epochs: 2") + """hydra:
  sweeper:
    study_name: prune
    n_trials: 2
    pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
    params:
      optimizer.lr: tag(log, interval(1e-9, 1e-2))
    baselines:
      - {optimizer.lr: 2.0e-3}
      - {optimizer.lr: 1.0e-9}
""",
    # an encoder timm does not have passes the checks before training and makes its trial exit with a
    # ConfigError when the model is built; the sweep records it and goes on
    "crash": with_sampler("random") + """hydra:
  sweeper:
    study_name: crash
    n_trials: 3
    max_failure_rate: 0.7
    sampler: {seed: 1}
    pruner: {name: none}
    params:
      model.encoder.name: choice(resnet10t, no_such_encoder)
    baselines:
      - {model.encoder.name: resnet10t}
      - {model.encoder.name: no_such_encoder}
""",
    "multi": with_sampler("nsgaii") + """hydra:
  sweeper:
    study_name: multi
    n_trials: 2
    sampler: {seed: 0}
    objectives:
      - {key: best_score, direction: auto}
      - {key: num_parameters, direction: minimize}
    params:
      model.decoder.channels: choice([16,16,16,16], [8,8,8,8])
""",
}
FAST = [*TINY, "trainer=cpu", "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep_root")
    (root / "sweep").mkdir()
    for name, text in SWEEPS.items():
        (root / "sweep" / f"{name}.yaml").write_text(text)
    return root


def command(root: Path, name: str, sweep_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segplat.train", "--multirun", f"sweep={name}", f"hydra.searchpath=[file://{root}]",
            f"hydra.sweep.dir={sweep_dir}", *FAST, *extra]


def searching(cmd: list[str], key: str) -> list[str]:
    """The command without FAST's plain value for `key`: a plain value on the command line fixes a searched key."""
    return [a for a in cmd if not a.startswith(f"{key}=")]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def load(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_stop_and_rerun_resumes_and_writes_outputs(root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "tiny"
    cmd = command(root, "tiny", sweep_dir, "hydra.sweeper.worker_trials=2")
    first = run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    assert states(load(sweep_dir, "tiny")) == ["COMPLETE", "COMPLETE", "WAITING"]  # the third baseline waits

    # stop the next run while its trial trains (SIGTERM, as a scheduler would): the trial is recorded
    # FAIL + interrupted and does not use the budget
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (sweep_dir / "trial_0002" / "command.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    study = load(sweep_dir, "tiny")
    interrupted = study.trials[2]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs.get("segplat_interrupted")
    # it was the third baseline: enqueued again, so it still runs
    requeued = study.trials[3]
    assert requeued.state == TrialState.WAITING and requeued.user_attrs["baseline"] == 2
    assert requeued.system_attrs["fixed_params"] == {"optimizer.lr": 5.0e-3, "optimizer.weight_decay": 0.01}

    again = run(cmd)  # the same command continues the study up to the budget
    assert again.returncode == 0, again.stderr[-3000:]
    study = load(sweep_dir, "tiny")
    assert states(study).count("COMPLETE") == 4
    assert study.trials[3].state == TrialState.COMPLETE and study.trials[3].params == interrupted.params
    assert "2 of 4 trials used" in again.stdout + again.stderr
    done = run(cmd)  # and a third time there is nothing left to do
    assert done.returncode == 0 and len(study.trials) == len(load(sweep_dir, "tiny").trials)
    assert "4 of 4 trials used" in done.stdout + done.stderr

    # each complete trial: its own run folder, the objective = its summary's best_score
    for t in load(sweep_dir, "tiny").get_trials(states=(TrialState.COMPLETE,)):
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        assert t.value == pytest.approx(summary["best_score"])
        assert f"optimizer.lr={t.params['optimizer.lr']!r}" in t.user_attrs["overrides"]
        # wandb groups a study's trials only when wandb is a tracker; TINY selects logger=none, which has no
        # logger.wandb to override (adding it would make every trial fail to compose)
        assert "logger.wandb.group=tiny" not in t.user_attrs["overrides"]

    # outputs
    for name in ("trials.csv", "history.png", "importance.png", "sweep_summary.json", "experiment/best.yaml"):
        assert (sweep_dir / name).is_file(), name
    assert len((sweep_dir / "trials.csv").read_text().strip().splitlines()) == 1 + 5
    best = load(sweep_dir, "tiny").best_trial
    cfg = compose_train(["experiment=best", f"hydra.searchpath=[file://{sweep_dir}]"])
    assert cfg.optimizer.lr == pytest.approx(best.params["optimizer.lr"])
    assert cfg.optimizer.weight_decay == best.params["optimizer.weight_decay"]

    # the study is readable by optuna's own command line
    optuna_cli = Path(sys.executable).with_name("optuna")
    out = run([str(optuna_cli), "trials", "--storage", f"sqlite:///{sweep_dir / 'study.db'}", "--study-name", "tiny",
               "-f", "json"])
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert sorted(r["state"] for r in rows) == ["COMPLETE"] * 4 + ["FAIL"]
    out = run([str(optuna_cli), "best-trial", "--storage", f"sqlite:///{sweep_dir / 'study.db'}", "--study-name",
               "tiny", "-f", "json"])
    assert out.returncode == 0 and json.loads(out.stdout)["number"] == best.number


def test_bad_trial_is_pruned_at_its_first_report(root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "prune"
    res = run(command(root, "prune", sweep_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    good, bad = load(sweep_dir, "prune").trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2]
    assert bad.state == TrialState.PRUNED and sorted(bad.intermediate_values) == [1]
    summary = json.loads((sweep_dir / "trial_0001" / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["epochs_completed"] == 1


def test_two_workers_share_one_budget(root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "duo"
    cmd = command(root, "tiny", sweep_dir, "hydra.sweeper.study_name=duo", "hydra.sweeper.n_trials=6",
                  "hydra/sweeper/sampler=random")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    trials = [t for t in load(sweep_dir, "duo").trials if t.state != TrialState.WAITING]
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(6))
    # no trial ran twice: each worker logged its own trial numbers, disjoint, six in all
    ran = [{int(n) for n in re.findall(r"\] trial (\d+) finished", out + err)} for out, err in outs]
    assert not (ran[0] & ran[1]) and len(ran[0] | ran[1]) == 6
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert all(len(list((sweep_dir / f"trial_{n:04d}").glob("summary.json"))) == 1 for n in range(6))


def test_crashing_trial_is_failed_and_the_sweep_goes_on(root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "crash"
    res = run(searching(command(root, "crash", sweep_dir), "model.encoder.name"))
    assert res.returncode == 0, res.stderr[-3000:]
    trials = load(sweep_dir, "crash").trials
    assert len(trials) == 3 and trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL and "no_such_encoder" in trials[1].user_attrs["error"]
    assert trials[1].user_attrs["returncode"] == 2
    # the warning names the cause (the trial's own error sentence) and a log that exists
    warning = next(line for line in (res.stdout + res.stderr).splitlines() if "trial 1 FAILED" in line)
    assert "no_such_encoder" in warning and "HYDRA_FULL_ERROR" not in warning
    assert f"(log: {sweep_dir / 'trial_0001' / 'stderr.log'})" in warning
    # past the maximum failure rate the sweep stops with one clear sentence
    res = run(searching(command(root, "crash", sweep_dir, "hydra.sweeper.n_trials=6",
                                "hydra.sweeper.max_failure_rate=0.1"), "model.encoder.name"))
    assert res.returncode == 2 and "hydra.sweeper.max_failure_rate=0.1" in res.stderr
    assert len(load(sweep_dir, "crash").trials) == 4


def test_multi_objective_keeps_the_pareto_front(root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multi"
    res = run(searching(command(root, "multi", sweep_dir), "model.decoder.channels"))
    assert res.returncode == 0, res.stderr[-3000:]
    study = load(sweep_dir, "multi")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2 and all(t.values[1] > 0 for t in complete)
    front = {t.number for t in study.best_trials}
    files = {p.name for p in (sweep_dir / "experiment").glob("pareto_*.yaml")}
    assert files == {f"pareto_{n:04d}.yaml" for n in front}
    assert json.loads((sweep_dir / "sweep_summary.json").read_text())["objectives"] == ["best_score", "num_parameters"]


def test_an_invalid_space_stops_before_anything_is_written(root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "invalid"
    res = run(command(root, "tiny", sweep_dir, "optimizer.encoder_lrr=choice(1e-3,1e-2)"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: the sweep parameter optimizer.encoder_lrr names no key of the composed config (did you mean " \
           "optimizer.encoder_lr?)" in res.stderr
    assert "Traceback" not in res.stderr and not sweep_dir.exists()  # no study.db, no trial folder


def test_two_trials_at_once_from_one_sweeper(root: Path, tmp_path: Path) -> None:
    """hydra.sweeper.n_jobs=2 on CPU: two trainings run side by side, each with half the CPU threads."""
    from segplat.sweep.slots import cpu_count

    sweep_dir = tmp_path / "pair"
    res = run(command(root, "tiny", sweep_dir, "hydra.sweeper.study_name=pair", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.n_jobs=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    trials = load(sweep_dir, "pair").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.WAITING]
    threads = str(max(1, cpu_count() // 2))
    assert all(t.user_attrs["threads"] == threads for t in trials[:2])
    first, second = (sweep_dir / f"trial_{n:04d}" for n in (0, 1))
    # the second trial started before the first one ended
    assert (second / "command.txt").stat().st_mtime < (first / "summary.json").stat().st_mtime
    assert f"2 trial(s) at once; OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}" in res.stdout + res.stderr
