"""hydra-optuna-sweeper's own distribution cases (plugins/hydra_optuna_sweeper/tests/test_optuna_sweeper_plugin.py in
facebookresearch/hydra): every expression there gives the distribution the peer expects, and a draw is of the type
the expression was written with. The expected values are the peer's, restated here as data."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from segplat.errors import ConfigError
from segplat.sweep import space as sp
from segplat.sweep.sweeper import OptunaSweeper

optuna.logging.set_verbosity(optuna.logging.WARNING)

# (expression, the distribution hydra-optuna-sweeper expects); shuffle() only promises the set of choices
PEER_CASES = [
    ("choice(1,2)", CategoricalDistribution([1, 2])),
    ("choice(true, false)", CategoricalDistribution([True, False])),
    ("choice('hello', 'world')", CategoricalDistribution(["hello", "world"])),
    ("shuffle(range(1,3))", CategoricalDistribution((1, 2))),
    ("range(1,3)", IntDistribution(1, 3)),
    ("interval(1, 5)", FloatDistribution(1, 5)),
    ("int(interval(1, 5))", IntDistribution(1, 5)),
    ("tag(log, interval(1, 5))", FloatDistribution(1, 5, log=True)),
    ("tag(log, int(interval(1, 5)))", IntDistribution(1, 5, log=True)),
    ("range(0.5, 5.5, step=1)", FloatDistribution(0.5, 5.5, step=1)),
    # the peer's example configs (example/conf/config.yaml, custom-search-space/, multi-objective-conf/)
    ("range(-5.5, 5.5, step=0.5)", FloatDistribution(-5.5, 5.5, step=0.5)),
    ("range(-5.5, 5.5, 0.5)", FloatDistribution(-5.5, 5.5, step=0.5)),
    ("choice(-5 ,0 ,5)", CategoricalDistribution([-5, 0, 5])),
    ("range(0, 5, step=0.5)", FloatDistribution(0, 5, step=0.5)),
    ("range(-1.0, 1.0, step=1)", FloatDistribution(-1.0, 1.0, step=1)),
    ("choice(\"foo\", \"bar\")", CategoricalDistribution(["foo", "bar"])),
]


@pytest.mark.parametrize(("expression", "expected"), PEER_CASES, ids=[c[0] for c in PEER_CASES])
def test_the_peers_expressions_give_the_peers_distributions(expression: str, expected) -> None:
    actual = sp.parse_expression("key", expression).distribution
    if isinstance(expected, CategoricalDistribution):
        assert isinstance(actual, CategoricalDistribution) and set(actual.choices) == set(expected.choices)
    else:
        assert actual == expected


@pytest.mark.parametrize(("expression", "kind"), [
    ("range(1,3)", int), ("int(interval(1, 5))", int), ("tag(log, int(interval(1, 5)))", int),
    ("tag(int, interval(1, 5))", int), ("tag(log, range(1, 9))", int), ("range(32, 97, 32)", int),
    ("interval(1, 5)", float), ("range(0.5, 5.5, step=1)", float), ("range(1, 3, step=0.5)", float),
    ("float(range(1, 3))", float), ("tag(log, interval(1e-4, 1e-2))", float),
])
def test_a_draw_is_of_the_type_written(expression: str, kind: type) -> None:
    param = sp.parse_expression("key", expression)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        value = sp.suggest(trial, [param], None)["key"]
        assert type(value) is kind, (expression, value)
        # and the override the trial receives reads back as the same type
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([f"key={param.override_text(value)}"])[0].value()
        assert type(parsed) is kind and parsed == value
        study.tell(trial, 0.0)


def test_a_range_reaches_its_stop_and_keeps_to_its_grid() -> None:
    # 32, 64, 96 (97 is not on the grid); 0..4 includes 4, as the peer's range does
    assert sp.finite_values(sp.parse_expression("k", "range(32, 97, 32)")) == [32, 64, 96]
    assert sp.finite_values(sp.parse_expression("k", "range(0, 4)")) == [0, 1, 2, 3, 4]
    assert sp.finite_values(sp.parse_expression("k", "shuffle(range(0, 4))")) == [0, 1, 2, 3]  # Hydra's own list


@pytest.mark.parametrize(("expression", "message"), [
    ("range(5, 1, -1)", r"range\(5, 1, step=-1\) is empty or descending; write it ascending"),
    ("tag(log, range(1.0, 5.0, step=0.5))", r"cannot log-scale a float range"),
    ("tag(int, interval(0.5, 5))", r"bounds must be whole numbers"),
    ("tag(log, range(1, 9, 2))", r"a log range needs step 1"),
    ("shuffle(range(3, 3))", r"lists no value"),
])
def test_what_optuna_cannot_honour_is_refused_in_one_sentence(expression: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        sp.parse_expression("key", expression)
    assert str(err.value).startswith("hydra.sweeper.params.key") and "\n" not in str(err.value)


def test_the_peers_override_split() -> None:
    """The peer's create_params_from_overrides cases: a sweep expression is searched, `key=5` is fixed for every
    trial, `~z` (a deletion) is passed to every trial as written."""
    sweeper = OptunaSweeper(params={"key1": "choice(1,2)"})
    sweeper.config = OmegaConf.create({})
    fixed, swept = sweeper.split_arguments(["key2=5", "key3=range(1,3)", "~z", "~y=10"])
    assert fixed == ["key2=5", "~z", "~y=10"]
    params = {p.key: p for p in sp.parse_params({**sweeper.params_spec, **swept})}
    assert params["key1"].distribution == CategoricalDistribution([1, 2])
    assert params["key3"].distribution == IntDistribution(1, 3)
    assert sp.parse_expression("key", "5").fixed == 5
