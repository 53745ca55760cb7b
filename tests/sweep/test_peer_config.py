"""hydra-optuna-sweeper's config keys through segplat's sweeper: the hydra/sweeper/sampler group, `direction` as a
list, `study_name`, `custom_search_space`, and its `optimization_results.yaml` (no trial is run here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segplat.config import CONF_DIR
from segplat.errors import ConfigError
from segplat.sweep import space as sp
from segplat.sweep.outputs import write_outputs
from segplat.sweep.study import AskTellGridSampler, build_sampler
from segplat.sweep.sweeper import OptunaSweeper

optuna.logging.set_verbosity(optuna.logging.WARNING)
SAMPLER_DIR = CONF_DIR / "hydra" / "sweeper" / "sampler"
# hydra-optuna-sweeper's sampler options (its config.py), each with the class its `_target_` names
PEER_SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "nsgaii": "NSGAIISampler",
                 "grid": "GridSampler", "gp": "GPSampler", "qmc": "QMCSampler"}


class OwnSampler(optuna.samplers.RandomSampler):
    """A user's sampler, named by `_target_` like any other."""

    def __init__(self, seed: int | None = None, spread: float = 1.0) -> None:
        super().__init__(seed=seed)
        self.spread = spread


def compose_sweeper(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["hydra/sweeper=segplat_optuna", *overrides],
                       return_hydra_config=True).hydra


@pytest.mark.parametrize("option", sorted(PEER_SAMPLERS))
def test_each_option_of_the_sampler_group_builds_its_sampler(option: str) -> None:
    hydra_cfg = compose_sweeper(f"hydra/sweeper/sampler={option}", "hydra.sweeper.sampler.seed=3")
    node = OmegaConf.to_container(hydra_cfg.sweeper.sampler)
    assert node["_target_"] == f"optuna.samplers.{PEER_SAMPLERS[option]}"
    # the peer's keys, as its config.py declares them
    assert set(node) - {"_target_", "_partial_"} == set(yaml.safe_load((SAMPLER_DIR / f"{option}.yaml").read_text())) \
        - {"_target_", "_partial_"}
    sampler = build_sampler(node, 3, {"a": [1, 2]})
    expected = AskTellGridSampler if option == "grid" else getattr(optuna.samplers, PEER_SAMPLERS[option])
    assert type(sampler) is expected
    # the same draws from the same seed: the seed reached the sampler
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=build_sampler(node, 3, {"a": [1, 2]}))
        trial = study.ask()
        draws.append(trial.suggest_categorical("a", [1, 2]) if option == "grid" else trial.suggest_float("x", 0, 1))
    assert draws[0] == draws[1]


def test_tpe_is_the_default_and_its_keys_reach_the_constructor() -> None:
    node = OmegaConf.to_container(compose_sweeper("+hydra.sweeper.sampler.group=true",
                                                  "hydra.sweeper.sampler.multivariate=true").sweeper.sampler)
    sampler = build_sampler(node, 0)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._group and sampler._n_startup_trials == 10


@pytest.mark.parametrize(("spec", "message"), [
    ({"_target_": "optuna.samplers.TPESampler", "n_startup_trial": 3},
     r"hydra\.sweeper\.sampler\.n_startup_trial is not a key of hydra\.sweeper\.sampler; did you mean "
     r"hydra\.sweeper\.sampler\.n_startup_trials\?"),
    ({"_target_": "optuna.samplers.TPESampler", "name": "random"},
     r"hydra\.sweeper\.sampler\.name=random names another sampler .* hydra/sweeper/sampler=random .*drop "
     r"hydra\.sweeper\.sampler\.name"),
    ({"_target_": "optuna.samplers.NoSuchSampler"}, r"_target_=optuna\.samplers\.NoSuchSampler cannot be imported"),
    ({"_target_": "optuna.pruners.MedianPruner"}, r"is not an Optuna sampler"),
    ({"_target_": "optuna.samplers.QMCSampler", "qmc_type": "nope"}, r"\(optuna\.samplers\.QMCSampler\) rejects"),
    ({"_target_": f"{__name__}.OwnSampler", "spread": "wide"},
     r"hydra\.sweeper\.sampler\.spread=wide must be a number"),
])
def test_a_wrong_sampler_config_is_refused_in_one_sentence(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_sampler(spec, 0)
    assert "\n" not in str(err.value)


def test_segplats_older_name_key_and_a_users_sampler() -> None:
    assert isinstance(build_sampler({"_target_": "optuna.samplers.NSGAIISampler", "name": "nsga2"}, 0),
                      optuna.samplers.NSGAIISampler)
    assert isinstance(build_sampler({"name": "random"}, 0), optuna.samplers.RandomSampler)
    own = build_sampler({"_target_": f"{__name__}.OwnSampler", "spread": 2.5}, 0)
    assert isinstance(own, OwnSampler) and own.spread == 2.5
    nested = build_sampler({"_target_": "optuna.samplers.CmaEsSampler",
                            "independent_sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 1}}, 0)
    assert isinstance(nested._independent_sampler, optuna.samplers.RandomSampler)


def sweeper(config: dict[str, Any], **kwargs: Any) -> OptunaSweeper:
    s = OptunaSweeper(**kwargs)
    s.config = OmegaConf.create(config)
    return s


MAX = {"callbacks": {"monitor": "val/miou", "mode": "max"}}


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, [("best_score", "maximize")]),
    ({"direction": "maximize"}, [("best_score", "maximize")]),
    ({"direction": ["maximize"]}, [("best_score", "maximize")]),
    ({"direction": ["maximize", "minimize"], "objectives": ["best_score", "num_parameters"]},
     [("best_score", "maximize"), ("num_parameters", "minimize")]),
    ({"direction": ["auto", "minimize"], "objectives": [{"key": "best_score"}, {"key": "seconds"}]},
     [("best_score", "maximize"), ("seconds", "minimize")]),
])
def test_direction_as_a_list_maps_onto_objectives(kwargs: dict[str, Any], expected: list) -> None:
    assert sweeper(MAX, **kwargs).objectives() == expected


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"direction": "minimize"}, r"would minimize best_score, the best val/miou .* callbacks\.mode=max .*"
                                r"hydra\.sweeper\.direction=maximize"),
    ({"direction": ["maximize", "minimize"]}, r"has 2 objectives, .*hydra\.sweeper\.objectives="),
    ({"direction": ["maximize", "minimize"], "objectives": ["best_score"]}, r"gives 2 direction\(s\) for 1"),
    ({"direction": ["maximise"]}, r"hydra\.sweeper\.direction\[0\]=maximise is not known; did you mean"),
    ({"direction": ["maximize", "maximize"], "objectives": ["best_score", {"key": "x", "direction": "minimize"}]},
     r"objectives\[1\]\.direction=minimize contradicts hydra\.sweeper\.direction\[1\]=maximize"),
])
def test_a_direction_that_cannot_be_meant_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweeper(MAX, **kwargs).objectives()


def test_custom_search_space_must_import() -> None:
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.custom_search_space=no_such\.module\.fn cannot be "
                                          r"imported"):
        sweeper(MAX, custom_search_space="no_such.module.fn").search_space_extender()
    assert sweeper(MAX, custom_search_space=f"{__name__}.extend").search_space_extender() is extend


def extend(config: Any, trial: optuna.trial.Trial) -> None:
    trial.suggest_float("+w", 0.0, 1.0)


def test_optimization_results_are_the_peers_file(tmp_path: Path) -> None:
    params = sp.parse_params({"x": "range(-5.5, 5.5, step=0.5)", "y": "choice(-5, 0, 5)",
                              "s": "choice([1,2],[3])"})
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        chosen = sp.suggest(trial, params, None)
        study.tell(trial, chosen["x"] ** 2 + chosen["y"] ** 2)
    write_outputs(study, tmp_path, params, set(), "sqlite://", ["best_score"])
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.name == "optuna" and results.best_value == study.best_value
    assert results.best_params.x == study.best_params["x"] and results.best_params.y == study.best_params["y"]
    assert list(results.best_params.s) == params[2].python_value(study.best_params["s"])  # a list, not its text

    multi = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = multi.ask()
        chosen = sp.suggest(trial, params[:2], None)
        multi.tell(trial, [chosen["x"] ** 2, chosen["y"] ** 2])
    write_outputs(multi, tmp_path, params[:2], set(), "sqlite://", ["a", "b"])
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and set(results) == {"name", "solutions"}
    assert sorted(tuple(s["values"]) for s in results["solutions"]) == sorted(tuple(t.values)
                                                                               for t in multi.best_trials)


def test_the_sampler_group_is_there_for_an_app_of_the_users_own(tmp_path: Path) -> None:
    """A user's own Hydra app (its config path is not segplat's) selects segplat's sweeper and its sampler group."""
    (tmp_path / "config.yaml").write_text("defaults:\n  - override hydra/sweeper: segplat_optuna\n"
                                          "  - override hydra/sweeper/sampler: nsgaii\nx: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert cfg.hydra.sweeper.sampler.population_size == 50


def test_custom_search_space_adds_its_draw_to_the_trial(tmp_path: Path) -> None:
    """The peer's custom-search-space example: what the function suggests after the params draw (`+w`, a new key)
    reaches the trial as an override, and the study holds it as a parameter."""
    from tests.sweep.test_trials import sweeper_with_study

    sweeper, study, parsed = sweeper_with_study(tmp_path, {"x": "range(-5.5, 5.5, 0.5)"},
                                                custom_search_space=f"{__name__}.extend")
    fn = sweeper.search_space_extender()
    result = sweeper.run_one(study, study.ask(), ["ok"], parsed, tmp_path, {}, False, "w",
                             [("best_score", "maximize")], fn)
    trial = study.trials[0]
    assert result["state"] == "COMPLETE" and set(trial.params) == {"x", "+w"}
    assert trial.user_attrs["overrides"] == ["ok", f"x={trial.params['x']!r}", f"+w={trial.params['+w']!r}"]
