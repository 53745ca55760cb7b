"""A resumed study keeps the choices its trials drew from (Optuna refuses other choices only mid-trial)."""

from __future__ import annotations

import optuna
import pytest

from segplat.errors import ConfigError
from segplat.sweep.space import Param
from segplat.sweep.sweeper import OptunaSweeper
from segplat.utils.task import config_error_hint


def study_with_one_trial() -> optuna.Study:
    study = optuna.create_study(study_name="s", direction="maximize")
    trial = study.ask()
    trial.suggest_categorical("dataset.patch_size", [64, 96])
    trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
    study.tell(trial, 0.5)
    return study


def test_other_choices_for_a_searched_key_are_refused_before_a_trial() -> None:
    sweeper, study = OptunaSweeper(study_name="s"), study_with_one_trial()
    same = [Param("dataset.patch_size", optuna.distributions.CategoricalDistribution([64, 96])),
            Param("optimizer.lr", optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True))]  # a range may move
    sweeper.check_space_matches(study, same, "sqlite:///x.db")
    other = [Param("dataset.patch_size", optuna.distributions.CategoricalDistribution([64, 32]))]
    with pytest.raises(ConfigError, match=r"^study 's' in sqlite:///x\.db searched dataset\.patch_size over "
                                          r"choice\(64, 96\), not choice\(64, 32\); .*sweeper\.study_name=NEW"):
        sweeper.check_space_matches(study, other, "sqlite:///x.db")


def test_a_sweep_line_is_not_explained_as_missing_multirun() -> None:
    """Any other failure of a --multirun command was reported as "... requires --multirun"."""
    assert config_error_hint("train", ["--multirun", "dataset.patch_size=choice(64,32)"]) is None
