"""The one walker (segplat.schema) and the one formatter (segplat.messages)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import pytest

from segplat.errors import ConfigError
from segplat.messages import did_you_mean, first_line, redact
from segplat.schema import Hint, PositiveInt, Probability, check_targets, describe, section, variants


@section
class Band:
    name: str
    scale: Annotated[float, Hint("pixels per label pixel")] = 1.0


def build(size: PositiveInt = 4, share: Probability = 0.5, mode: Literal["once", "read", "off"] = "once",
          flag: bool = False, bands: Mapping[str, Band] | None = None, stages: tuple[int, ...] | None = None,
          names: Sequence[str] = (), extra: Any = None) -> None:
    """A target with one key of each kind the walker checks."""


def takes_anything(size: PositiveInt = 1, **kwargs: Any) -> None:
    """`**kwargs` reaching no further signature: any key is taken."""


T = f"{__name__}.build"


def fast(rate: PositiveInt = 1, burst: bool = False) -> None:
    """One kind's keys."""


def slow(rate: PositiveInt = 1, delay: Probability = 0.5) -> None:
    """Another kind's keys."""


@variants("kind", {"fast": fast, "slow": slow})
def paced(kind: str = "fast", **options: Any) -> None:
    """A factory whose keys depend on `kind`."""


def test_a_key_of_another_kind_is_refused_naming_that_kind() -> None:
    node = {"_target_": f"{__name__}.paced"}
    check_targets({"pace": {**node, "kind": "slow", "delay": 0.2, "rate": 3}})
    check_targets({"pace": {**node, "burst": True}})  # the default kind's key
    with pytest.raises(ConfigError, match=r"^pace\.delay does nothing for pace\.kind=fast; it belongs to "
                                          r"pace\.kind=slow; remove it\.$"):
        check_targets({"pace": {**node, "delay": 0.2}})
    with pytest.raises(ConfigError, match=r"^pace\.delay=2 must be a number from 0 to 1\.$"):
        check_targets({"pace": {**node, "kind": "slow", "delay": 2}})
    with pytest.raises(ConfigError, match=r"^pace\.kind=quick is not known; use fast or slow\.$"):
        check_targets({"pace": {**node, "kind": "quick"}})
    with pytest.raises(ConfigError, match=r"^pace\.rat is not a key of pace; did you mean pace\.rate\?$"):
        check_targets({"pace": {**node, "rat": 2}})


def refusal(node: dict, root: str = "block") -> str:
    with pytest.raises(ConfigError) as err:
        check_targets({root: {"_target_": T, **node}})
    text = str(err.value)
    assert "\n" not in text and text.endswith((".", "?")), text
    return text


@pytest.mark.parametrize(("node", "expected"), [
    ({"size": -4}, "block.size=-4 must be a positive integer."),
    ({"size": 2.5}, "block.size=2.5 must be a positive integer."),
    ({"size": True}, "block.size=true must be a positive integer."),
    ({"share": 1.5}, "block.share=1.5 must be a number from 0 to 1."),
    ({"flag": "no"}, "block.flag=no must be true or false."),
    ({"mode": "onse"}, "block.mode=onse is not known; did you mean block.mode=once? (the options: once, read or off)."),
    ({"mode": "zzz"}, "block.mode=zzz is not known; use once, read or off."),
    ({"sise": 3}, "block.sise is not a key of block; did you mean block.size?"),
    ({"bands": {"rgb": {"name": "r", "scal": 2}}}, "block.bands.rgb.scal is not a key of block.bands.rgb; did you mean "
                                                   "block.bands.rgb.scale?"),
    ({"bands": {"rgb": {"name": "r", "scale": "x"}}},
     "block.bands.rgb.scale=x must be a number; pixels per label pixel."),
    ({"names": "rgb"}, "block.names=rgb must be a list of strings."),
])
def test_wrong_values_are_refused_naming_the_full_key(node: dict, expected: str) -> None:
    assert refusal(node) == expected


def test_right_values_pass_as_configs_write_them() -> None:
    check_targets({"block": {"_target_": T, "size": 3, "share": 1, "mode": "read", "flag": True,
                             "bands": {"rgb": {"name": "r"}}, "stages": [1, 2], "names": ["a"], "extra": {"x": 1}}})


def test_a_nested_target_is_checked_at_its_own_path_and_kwargs_take_anything() -> None:
    inner = {"_target_": f"{__name__}.takes_anything", "anything": 1, "size": 0}
    with pytest.raises(ConfigError, match=r"^model\.extra\.size=0 must be a positive integer\.$"):
        check_targets({"model": {"_target_": T, "extra": inner}})


def test_an_unimportable_target_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"^model\._target_=nowhere\.Net cannot be imported"):
        check_targets({"model": {"_target_": "nowhere.Net"}})


def test_describe() -> None:
    from annotated_types import MinLen

    assert describe(Annotated[list[PositiveInt], MinLen(2)]) == "a list of at least 2 positive integers"
    assert describe(Annotated[str, MinLen(1)]) == "a non-empty string"
    assert describe(tuple[int, int, int]) == "a list of 3 integers"
    assert describe(PositiveInt | Literal["auto"]) == "a positive integer or one of auto"
    assert describe(Probability | None) == "a number from 0 to 1 or null"


@pytest.mark.parametrize(("text", "expected"), [
    ("http://user:se/cret@host:5000", "http://user:***@host:5000"),  # the trackers' old copy leaked this one
    ("https://me:p@ss:w/rd@mlflow.example:443/api?x=1", "https://me:***@mlflow.example:443/api?x=1"),
    ("postgresql+psycopg2://me:s3cr:t/p@ss@db.example:5433/optuna", "postgresql+psycopg2://me:***@db.example:5433/optuna"),
    ("host=db user=me password=s3cret dbname=optuna", "host=db user=me password=*** dbname=optuna"),
    ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ("postgresql://me@host/db", "postgresql://me@host/db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact_hides_every_password_shape(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_did_you_mean_and_first_line() -> None:
    assert did_you_mean("max_epoch", ["max_epochs", "patience"]) == "max_epochs"
    assert did_you_mean("zzz", ["max_epochs"]) is None
    assert first_line(ValueError("bad value.\nmore")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
