"""One wrong value for every typed key of every shipped option: refused in one sentence that names the full key.

The wrong values are derived from the annotations the walker reads (`segplat.schema.signature_of` for `_target_`
nodes, the `@section` dataclasses for closed sections and the tasks' own keys), never listed by hand: for each key,
a value of a type the annotation does not admit, a number just outside an annotated range, a word outside a
`Literal`'s choices, a list holding one wrong item; for each `_target_` node (whose signature is closed) and each
section, a key it does not have. Each goes through the check a task runs first: `check_config` for the training
config (what every run and each sweep draw pass), `check_values` for predict, evaluate, prepare and summary.

Each option of a config group is composed with `train` and owns the nodes under its group's key (`dataset=geotiff`:
`dataset` and `dataset.layout`); an experiment or debug option owns the nodes under the keys it sets; each task owns
its own keys. Keys the walker does not type (`Any`, a library's own arguments) are left out, so a new key that is
typed is covered as soon as it ships.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from omegaconf import DictConfig, OmegaConf, open_dict

from segplat import schema
from segplat.config import check_config, check_values
from segplat.errors import ConfigError
from segplat.evaluate import EvaluateTask
from segplat.models.summary import SummaryTask
from segplat.predict.task import PredictTask
from segplat.prepare import PrepareTask
from segplat.utils.task import compose_config
from tests.conftest import CONF_DIR, compose_train

UNKNOWN = "zz_not_a_key"
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "sweep"))
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# the options a plain `python -m segplat.train` composes run in the quick loop; every other option is `slow`
DEFAULTS = {(k, v) for e in yaml.safe_load((CONF_DIR / "train.yaml").read_text())["defaults"] if isinstance(e, dict)
            for k, v in e.items()}
# task -> (required keys, its section, closed): the task's check is check_values(cfg, section, closed)
TASKS = {"predict": (["ckpt=x.ckpt", "input=x.tif"], PredictTask, True),
         "evaluate": (["ckpt=x.ckpt"], EvaluateTask, True),
         "prepare": ([], PrepareTask, True), "summary": ([], SummaryTask, False)}


# -- wrong values from an annotation ----------------------------------------------------------------------------
def _strip(tp: Any) -> tuple[Any, list[Any]]:
    meta: list[Any] = []
    while get_origin(tp) is typing.Annotated:
        tp, meta = get_args(tp)[0], [*meta, *get_args(tp)[1:]]
    return tp, meta


def _members(tp: Any) -> list[Any]:
    """The members of a union, or the type itself (with its Annotated metadata)."""
    base, _ = _strip(tp)
    return list(get_args(base)) if get_origin(base) in (Union, types.UnionType) else [tp]


def _kinds(tp: Any) -> set[str] | None:
    """The plain kinds a config value of type `tp` may be (None: the test cannot tell, so it feeds nothing)."""
    out: set[str] = set()
    for member in _members(tp):
        base, _ = _strip(member)
        origin = get_origin(base) or base
        if base is Any:
            return None
        if base is type(None):
            out.add("null")
        elif base is bool:
            out.add("bool")
        elif base is int:
            out.add("int")
        elif base is float:
            out |= {"int", "float"}
        elif base is str or (isinstance(base, type) and issubclass(base, PurePath)):
            out.add("str")
        elif origin is Literal:
            out |= {"choice"}
        elif schema.is_section(base) or origin in (dict, Mapping) or (
                isinstance(origin, type) and issubclass(origin, Mapping)):
            out.add("mapping")
        elif origin in (list, tuple, Sequence) or (isinstance(origin, type) and issubclass(origin, Sequence)):
            out.add("list")
        else:
            return None  # a class the config cannot hold as plain data
    return out


SAMPLES = (("str", "zz-wrong"), ("float", 2.5), ("bool", True), ("list", [7]), ("mapping", {"zz": 7}))


def wrong_values(tp: Any) -> list[tuple[str, Any]]:
    """(what is wrong, value) for a key of type `tp`: another type, outside a range, an unknown choice, a wrong item."""
    kinds = _kinds(tp)
    if kinds is None:
        return []
    out: list[tuple[str, Any]] = []
    kind, value = next((k, v) for k, v in SAMPLES if k not in kinds)
    out.append(("unknown choice" if kind == "str" and "choice" in kinds else f"a {kind} value", value))
    for member in _members(tp):
        base, meta = _strip(member)
        if base in (int, float):
            step = 1 if base is int else 0.5
            for m in meta:
                bad = {Gt: m.gt if isinstance(m, Gt) else None, Ge: m.ge - step if isinstance(m, Ge) else None,
                       Lt: m.lt if isinstance(m, Lt) else None, Le: m.le + step if isinstance(m, Le) else None}
                if bad.get(type(m)) is not None:
                    out.append((f"outside {m}", bad[type(m)]))
        origin, args = get_origin(base), get_args(base)
        if origin in (list, tuple, Sequence) and args and args[0] is not Ellipsis and not schema.is_section(
                _strip(args[0])[0]):
            items = wrong_values(args[0])
            if items:  # a range is the more telling item when there is one
                size = len(args) if origin is tuple and args[-1] is not Ellipsis else 1
                out.append(("a wrong item", [items[-1][1]] * size))
    return out


# -- what each option owns ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    key: str  # the full key
    value: Any  # what is set there (UNKNOWN: a key the node or section does not have)
    why: str


def section_cases(key: str, cls: type, given: Mapping[str, Any]) -> Iterator[Case]:
    hints = typing.get_type_hints(cls, include_extras=True)
    yield Case(f"{key}.{UNKNOWN}" if key else UNKNOWN, 1, "unknown key")
    for field in dataclasses.fields(cls):
        yield from key_cases(f"{key}.{field.name}" if key else field.name, hints.get(field.name, Any),
                             given.get(field.name, dataclasses.MISSING))


def key_cases(key: str, tp: Any, current: Any) -> Iterator[Case]:
    """Cases for one key (recursing into a closed section that is set)."""
    if isinstance(current, Mapping) and "_target_" in current:
        return  # a node of its own
    where = schema._section_in(tp, current)
    if where is not None and isinstance(current, Mapping | list):
        kind, cls = where
        if kind == "self":
            yield from section_cases(key, cls, current)
        elif kind == "values":
            for name, item in current.items():
                if isinstance(item, Mapping):
                    yield from section_cases(f"{key}.{name}", cls, item)
        elif kind == "items" and current and isinstance(current[0], Mapping):
            yield from section_cases(f"{key}[0]", cls, current[0])
    for why, value in wrong_values(tp):
        yield Case(key, value, why)


def node_cases(path: str, node: Mapping[str, Any]) -> Iterator[Case]:
    sig = schema.signature_of(str(node["_target_"]))
    if not sig.open:
        yield Case(f"{path}.{UNKNOWN}", 1, "unknown key")
    if not sig.typed:
        return
    for name, param in sig.params.items():
        if param.annotation in (Any, inspect.Parameter.empty) or (name == "root" and path.endswith("layout")):
            continue
        yield from key_cases(f"{path}.{name}", param.annotation, node.get(name, param.default))


def owned_keys(group: str, option: str) -> list[str]:
    """The top-level keys an option decides: its group's, or for an experiment or debug option the keys it sets."""
    if group not in ("experiment", "debug"):
        return [group]
    text = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    keys = {str(k) for k in text if k != "defaults"}
    for entry in text.get("defaults", []):
        if isinstance(entry, Mapping):
            keys |= {str(k).split("/")[-1].split("@")[0] for k in entry}
    return sorted(keys)


@functools.cache
def composed(task: str, overrides: tuple[str, ...]) -> DictConfig:
    """The config with every interpolation resolved (what the check sees), composed once per option."""
    cfg = compose_train(list(overrides), output_dir=PurePath("/tmp/fuzz")) if task == "train" else \
        compose_config(task, list(overrides))
    if task != "train":
        with open_dict(cfg):
            cfg.paths.output_dir = "/tmp/fuzz"
    plain = schema.plain_config(cfg)
    return OmegaConf.create({k: v for k, v in plain.items() if k != "hydra"})


def cases_of(task: str, overrides: tuple[str, ...], owned: Sequence[str]) -> list[Case]:
    cfg = composed(task, overrides)
    tree = OmegaConf.to_container(cfg)
    out = [c for path, node in schema.target_nodes(tree) if path.split(".")[0].split("[")[0] in owned
           for c in node_cases(path, node)]
    if task in TASKS:
        _, section, closed = TASKS[task]
        task_cases = list(section_cases("", section, tree))
        out += task_cases if closed else [c for c in task_cases if c.why != "unknown key"]
    return out


# -- the check ----------------------------------------------------------------------------------------------------
def _set(cfg: DictConfig, key: str, value: Any) -> Any:
    """Set `key` (dotted, `[i]` for a list item) and return what was there (MISSING when nothing)."""
    parent_key, _, last = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if "[" in last:
        name, index = last[:-1].split("[")
        parent, last = parent[name], int(index)
    with open_dict(parent):
        before = parent[last] if (isinstance(last, int) or last in parent) else dataclasses.MISSING
        parent[last] = value
    return before


def _restore(cfg: DictConfig, key: str, before: Any) -> None:
    parent_key, _, last = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    with open_dict(parent):
        if before is dataclasses.MISSING:
            del parent[last]
        else:
            parent[last] = before


def refused(task: str, overrides: tuple[str, ...], owned: Sequence[str]) -> list[str]:
    """Every case of an option through the task's check; the problems found (empty when each was refused well)."""
    cfg = composed(task, overrides)
    if task in TASKS:
        _, section, closed = TASKS[task]
        check = functools.partial(check_values, task=section, closed=closed)
    else:
        check = check_config
        try:
            check(cfg)
        except ConfigError:  # refused by a rule with the default model (a model's own fusion entry): types only
            check = check_values
    check(cfg)  # the option itself passes
    problems = []
    for case in cases_of(task, overrides, owned):
        if "[" in case.key.rpartition(".")[0]:
            continue  # inside a list of sections: set through its list (not shipped yet)
        before = _set(cfg, case.key, case.value)
        try:
            check(cfg)
            problems.append(f"{case.key}={case.value!r} ({case.why}) was accepted")
        except ConfigError as err:
            text = str(err)
            if case.key not in text or "\n" in text or not text.endswith((".", "?")):
                problems.append(f"{case.key}={case.value!r} ({case.why}): {text!r}")
        finally:
            _restore(cfg, case.key, before)
    return problems


@pytest.mark.parametrize(("group", "option"), [
    pytest.param(g, o, id=f"{g}={o}", marks=() if (g, o) in DEFAULTS else pytest.mark.slow) for g, o in OPTIONS])
def test_every_typed_key_of_an_option_refuses_a_wrong_value(group: str, option: str) -> None:
    if (CONF_DIR / group / f"{option}.yaml").read_text().lstrip().startswith("# @package _global_") and \
            group not in ("experiment", "debug"):
        pytest.skip("a global package")
    problems = refused("train", (f"{group}={option}",), owned_keys(group, option))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_key_refuses_a_wrong_value(task: str) -> None:
    problems = refused(task, tuple(TASKS[task][0]), owned=())
    assert not problems, "\n".join(problems)


def test_the_generator_derives_a_wrong_value_of_each_kind() -> None:
    """What the fuzz feeds, read from the annotations (so that a new alias or shape is fed too)."""
    from segplat.data.datamodule import DataModule

    hints = typing.get_type_hints(DataModule.__init__, include_extras=True)
    assert ("outside Gt(gt=0)", 0) in wrong_values(hints["batch_size"])
    assert ("unknown choice", "zz-wrong") in wrong_values(hints["verify"])
    assert ("a float value", 2.5) in wrong_values(hints["name"])
    assert ("a str value", "zz-wrong") in wrong_values(hints["progress"])
    assert {why for why, _ in wrong_values(hints["class_balanced"])} == {"a str value", "outside Ge(ge=0)",
                                                                         "outside Le(le=1)"}
    cases = list(section_cases("dataset.augment", schema._section_in(hints["augment"], {})[1], {}))
    assert Case("dataset.augment.zz_not_a_key", 1, "unknown key") in cases
    assert Case("dataset.augment.scale_range", [0.5, 0.5], "a wrong item") in cases
