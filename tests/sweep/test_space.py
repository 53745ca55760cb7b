"""Search-space parsing, conditional parameters, override formatting and the shared trial budget (no training)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from segplat.config import CONF_DIR
from segplat.errors import ConfigError
from segplat.sweep import space as sp
from segplat.sweep.study import (
    admit,
    ask_within_budget,
    budget_used,
    build_pruner,
    build_sampler,
    make_storage,
    trial_id,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_expressions_map_to_distributions() -> None:
    params = {p.key: p for p in sp.parse_params({
        "a": "choice(early, mid)", "b": "range(32, 97, 32)", "c": "tag(log, interval(1e-5, 1e-2))",
        "d": "tag(int, interval(1, 4))", "e": "choice([1,2],[2])", "f": 0.5})}
    assert params["a"].distribution == optuna.distributions.CategoricalDistribution(["early", "mid"])
    # 97 is not on the grid: 32, 64, 96
    assert params["b"].distribution == optuna.distributions.IntDistribution(32, 96, step=32)
    assert params["c"].distribution == optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    assert params["d"].distribution == optuna.distributions.IntDistribution(1, 4)
    assert params["e"].distribution.choices == ("[1,2]", "[2]")
    assert params["e"].python_value("[1,2]") == [1, 2]
    assert params["f"].distribution is None and params["f"].fixed == 0.5


@pytest.mark.parametrize("bad", ["interval(2, 1)", "range(5, 1)", "tag(log, interval(0, 1))", "tag(foo, choice(a))",
                                 "choice(a, a)", "choice(a"])
def test_bad_expressions_name_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.params\.k"):
        sp.parse_params({"k": bad})


def test_format_value_round_trips_through_hydra() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in ["mid", "a b", "1.5", "true", 3, 1e-05, None, True, [1, 2], "x'y"]:
        text = sp.format_value(value)
        assert parser.parse_overrides([f"k={text}"])[0].value() == value, text


def test_production_sweep_file_conditions() -> None:
    """fusion.type/stages are sampled only when fusion.level=mid, and come after it whatever the file order."""
    cfg = OmegaConf.load(CONF_DIR / "sweep" / "fusion_patch_lr.yaml")
    raw = dict(cfg.hydra.sweeper.params)
    reordered = {"fusion.stages": raw["fusion.stages"], **{k: v for k, v in raw.items() if k != "fusion.stages"}}
    params = sp.parse_params(reordered)
    keys = [p.key for p in params]
    assert keys.index("fusion.level") < keys.index("fusion.stages")
    assert {"fusion.level", "dataset.patch_size", "optimizer.encoder_lr", "optimizer.decoder_lr"} <= set(keys)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        chosen = sp.suggest(trial, params, None)
        level = chosen["fusion.level"]
        seen.add(level)
        assert ("fusion.stages" in chosen) == (level == "mid") == ("fusion.type" in chosen)
        study.tell(trial, 0.0)
    assert seen == {"early", "mid", "late"}


def test_condition_on_a_config_value_and_unknown_key() -> None:
    params = sp.parse_params({"x": {"when": {"fusion.level": ["mid", "late"]}, "values": "choice(1, 2)"}})
    trial = optuna.create_study().ask()
    assert sp.suggest(trial, params, OmegaConf.create({"fusion": {"level": "early"}})) == {}
    assert set(sp.suggest(trial, params, OmegaConf.create({"fusion": {"level": "late"}}))) == {"x"}
    bad = sp.parse_params({"x": {"when": {"fusion.levl": "mid"}, "values": "choice(1, 2)"}})
    with pytest.raises(ConfigError, match=r"fusion\.levl"):
        sp.suggest(optuna.create_study().ask(), bad, OmegaConf.create({"fusion": {"level": "mid"}}))
    with pytest.raises(ConfigError, match="cycle"):
        sp.parse_params({"a": {"when": {"b": 1}, "values": "choice(1)"},
                         "b": {"when": {"a": 1}, "values": "choice(1)"}})


def test_grid_and_factories() -> None:
    params = sp.parse_params({"a": "choice(x, y)", "b": "range(1, 3)"})
    assert sp.grid_space(params) == {"a": ["x", "y"], "b": [1, 2, 3]}
    with pytest.raises(ConfigError, match="grid sampler"):
        sp.grid_space(sp.parse_params({"c": "interval(0, 1)"}))
    assert isinstance(build_sampler({"name": "tpe", "n_startup_trials": 3}, 0), optuna.samplers.TPESampler)
    assert isinstance(build_sampler({"name": "grid"}, 0, {"a": [1]}), optuna.samplers.GridSampler)
    assert isinstance(build_pruner({"name": "hyperband", "min_resource": 1}), optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner({"name": "none"}), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match=r"sampler\.name=annealing"):
        build_sampler({"name": "annealing"}, 0)
    with pytest.raises(ConfigError, match=r"pruner\.name=early"):
        build_pruner({"name": "early"})


def test_grid_sampler_runs_ask_and_tell_to_the_last_point() -> None:
    """optuna's GridSampler stops the study after the last point, which raised outside study.optimize."""
    study = optuna.create_study(sampler=build_sampler({"name": "grid"}, 0, {"a": [1, 2]}))
    for _ in range(2):
        trial = study.ask()
        trial.suggest_categorical("a", [1, 2])
        study.tell(trial, 1.0)
    assert study.sampler.is_exhausted(study) and [t.state.name for t in study.trials] == ["COMPLETE"] * 2


def test_budget_holds_when_two_workers_pass_the_check_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    sa, sb = make_storage(url), make_storage(url)
    a = optuna.create_study(study_name="b", storage=sa)
    b = optuna.load_study(study_name="b", storage=sb)
    first = ask_within_budget(a, sa, 2)
    assert first is not None and admit(a, sa, first, 2)
    # both workers saw 1 of 2 used and asked: the later trial number is past the budget and is given back
    ta, tb = a.ask(), b.ask()
    assert admit(a, sa, ta, 2) and not admit(b, sb, tb, 2)
    assert budget_used(a) == 2 and ask_within_budget(b, sb, 2) is None
    state = b.get_trials(deepcopy=False)[tb.number].state
    assert state == optuna.trial.TrialState.WAITING
    # a larger budget later (a resume) reuses the given-back trial instead of leaving a hole
    again = ask_within_budget(b, sb, 3)
    assert again is not None and again.number == tb.number


@pytest.mark.parametrize("retry", [0, 1])
@pytest.mark.slow
def test_trial_of_a_dead_worker_is_failed_or_retried(tmp_path: Path, retry: int) -> None:
    """A RUNNING trial whose heartbeat stops is FAILED by the next worker; with retries it is re-queued
    (same parameters) and the failed attempt gives its budget slot to the retry."""
    import time
    import warnings

    from optuna.storages import fail_stale_trials

    warnings.simplefilter("ignore")
    url = f"sqlite:///{tmp_path / 'h.db'}"
    storage = make_storage(url, heartbeat_interval=1, grace_period=1, retry_failed=retry)
    dead = optuna.create_study(study_name="h", storage=storage)
    trial = ask_within_budget(dead, storage, 5)
    trial.suggest_float("x", 0, 1)
    storage.record_heartbeat(trial_id(storage, dead, trial.number))
    time.sleep(2.5)  # the worker "died": no more heartbeats
    alive_storage = make_storage(url, heartbeat_interval=1, grace_period=1, retry_failed=retry)
    alive = optuna.load_study(study_name="h", storage=alive_storage)
    fail_stale_trials(alive)
    trials = alive.get_trials(deepcopy=False)
    assert trials[0].state == optuna.trial.TrialState.FAIL
    if retry:
        assert trials[1].state == optuna.trial.TrialState.WAITING and budget_used(alive) == 0
        again = ask_within_budget(alive, alive_storage, 5)
        assert again.number == 1 and again.suggest_float("x", 0, 1) == trials[0].params["x"]
    else:
        assert len(trials) == 1 and budget_used(alive) == 1


@pytest.mark.parametrize(("name", "module", "cls"), [("gp", "scipy", "GPSampler"), ("cmaes", "cmaes", "CmaEsSampler")])
def test_optional_samplers_build_or_say_what_to_install(name: str, module: str, cls: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        with pytest.raises(ConfigError, match=f"pip install {module}"):
            build_sampler({"name": name}, 0)
    else:
        assert type(build_sampler({"name": name}, 0)).__name__ == cls
