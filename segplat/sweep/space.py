"""Search spaces: Hydra sweep expressions -> Optuna distributions, with conditional parameters.

A sweep file's `hydra.sweeper.params` maps a config key to either
- a Hydra sweep expression, read as hydra-optuna-sweeper reads it (its own test cases are in
  tests/sweep/test_space_peer.py): `choice(a, b)`; `range(start, stop[, step])`, the values from
  start up to and including stop (Optuna's `high`; integers unless a bound or the step is a float);
  `interval(low, high)` (floats); `int(interval(1, 5))` or `tag(int, interval(...))` (integers);
  `tag(log, ...)` (log scale); `shuffle(range(...))` / `shuffle(choice(...))` (a choice among the
  values Hydra's own sweep would list: for a range, start up to but excluding stop); or a plain value
  (fixed);
- or a mapping `{when: {KEY: VALUE | [VALUES]}, values: EXPRESSION}`: the parameter is searched
  only when every KEY (a searched parameter, a fixed override or a base config value) equals
  VALUE (or one of VALUES); otherwise it is not sampled and the config keeps its own value.

A draw is of the type written: integer bounds, `int(...)` and `tag(int, ...)` draw integers, a float
anywhere in a range or interval draws floats. What Optuna cannot honour (a descending range, a log
scale on a stepped float range, an integer interval with fractional bounds) is refused before any trial.

Choices that are not scalars (lists, dicts) are stored in Optuna as their override text
(`[2,3]`), so the study stays readable by the `optuna` command line and dashboard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, ListConfig, OmegaConf

from segplat.errors import ConfigError

log = logging.getLogger("segplat.sweep")
SCALARS = (str, int, float, bool, type(None))
MISSING = object()


def format_value(value: Any) -> str:
    """The Hydra override text of a value (quoted when the grammar would read it otherwise)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    try:  # a bare word that parses back as the same string needs no quotes
        parsed = OverridesParser.create().parse_overrides([f"k={text}"])[0]
        if not parsed.is_sweep_override() and parsed.value() == text:
            return text
    except Exception:
        pass
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Param:
    """One searched (or fixed) key of the config."""

    key: str
    distribution: optuna.distributions.BaseDistribution | None = None
    fixed: Any = None  # the value when `distribution` is None
    when: dict[str, list[Any]] = field(default_factory=dict)
    # category stored in optuna -> override text, for non-scalar choices
    texts: dict[Any, str] = field(default_factory=dict)

    def override_text(self, value: Any) -> str:
        if value in self.texts:
            return self.texts[value]
        return format_value(value)

    def to_storage(self, value: Any) -> Any:
        """A user's value (e.g. a baseline's list) as the category stored in Optuna."""
        if isinstance(value, list | tuple | Mapping):
            return format_value(value)
        return value

    def python_value(self, value: Any) -> Any:
        """The value for a YAML file (lists back as lists)."""
        if value in self.texts:
            return OverridesParser.create().parse_overrides([f"k={self.texts[value]}"])[0].value()
        return value


def _categorical(key: str, items: Sequence[Any]) -> tuple[optuna.distributions.BaseDistribution, dict[Any, str]]:
    choices, texts = [], {}
    for item in items:
        if isinstance(item, SCALARS):
            choices.append(item)
        else:
            text = format_value(item)
            texts[text] = text
            choices.append(text)
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"hydra.sweeper.params.{key} lists a choice twice; list each once.")
    return optuna.distributions.CategoricalDistribution(choices), texts


def _last_on_grid(start: float, stop: float, step: float) -> float:
    """The largest start + n*step <= stop (Optuna's `high` of a stepped distribution), free of float noise."""
    from decimal import Decimal

    lo, hi, st = Decimal(repr(start)), Decimal(repr(stop)), Decimal(repr(step))
    return float(lo + ((hi - lo) // st) * st)


def _range(key: str, sweep: RangeSweep, tags: set[str]) -> optuna.distributions.BaseDistribution:
    """hydra-optuna-sweeper's range: start to stop inclusive (Optuna's low/high), step 1 unless given."""
    start, stop, step = sweep.start, sweep.stop, sweep.step if sweep.step is not None else 1
    written = f"hydra.sweeper.params.{key}=range({start}, {stop}, step={step})"
    if step <= 0 or stop < start:
        raise ConfigError(f"{written} is empty or descending; write it ascending with a positive step, "
                          "e.g. range(1, 5) for 1, 2, 3, 4, 5.")
    floats = any(isinstance(v, float) for v in (start, stop, step))
    last = _last_on_grid(start, stop, step)
    if not floats:
        if "log" in tags and step != 1:
            raise ConfigError(f"{written}: a log range needs step 1 in Optuna; drop the step.")
        return optuna.distributions.IntDistribution(int(start), int(last), log="log" in tags, step=int(step))
    if "log" in tags:
        raise ConfigError(f"{written}: Optuna cannot log-scale a float range with a step; use "
                          "tag(log, interval(a, b)).")
    high = float(stop) if math.isclose(last, stop, rel_tol=0, abs_tol=1e-12) else last
    return optuna.distributions.FloatDistribution(float(start), high, step=float(step))


def _interval(key: str, sweep: IntervalSweep, tags: set[str]) -> optuna.distributions.BaseDistribution:
    """Floats, or integers when both bounds are (`int(interval(...))`) or the int tag is given."""
    low, high = sweep.start, sweep.end
    if not low < high:
        raise ConfigError(f"hydra.sweeper.params.{key}=interval({low}, {high}) needs low < high.")
    if "log" in tags and low <= 0:
        raise ConfigError(f"hydra.sweeper.params.{key}: a log interval needs low > 0, not {low}.")
    integers = "int" in tags or (isinstance(low, int) and isinstance(high, int))
    if not integers:
        return optuna.distributions.FloatDistribution(float(low), float(high), log="log" in tags)
    if float(low) != int(low) or float(high) != int(high):
        raise ConfigError(f"hydra.sweeper.params.{key}=tag(int, interval({low}, {high})) draws integers, so its "
                          "bounds must be whole numbers; write them as integers.")
    return optuna.distributions.IntDistribution(int(low), int(high), log="log" in tags)


def _distribution(key: str, sweep: Any) -> tuple[optuna.distributions.BaseDistribution, dict[Any, str]]:
    tags = set(getattr(sweep, "tags", set()) or set())
    unknown = tags - {"log", "int"}
    if unknown:
        raise ConfigError(f"hydra.sweeper.params.{key} has tag(s) {sorted(unknown)}; only log and int are known.")
    if isinstance(sweep, ChoiceSweep):
        if tags:
            raise ConfigError(f"hydra.sweeper.params.{key}: tags do not apply to choice(...); remove them.")
        return _categorical(key, sweep.list)
    if isinstance(sweep, RangeSweep) and sweep.shuffle:
        # hydra-optuna-sweeper: a choice among the values Hydra's own range lists (stop excluded), in their order
        if tags:
            raise ConfigError(f"hydra.sweeper.params.{key}: tags do not apply to shuffle(range(...)); remove them.")
        values = list(sweep.range())
        if not values:
            raise ConfigError(f"hydra.sweeper.params.{key}=shuffle(range({sweep.start}, {sweep.stop})) lists no "
                              "value; write start < stop.")
        return _categorical(key, values)
    if isinstance(sweep, RangeSweep):
        return _range(key, sweep, tags), {}
    if isinstance(sweep, IntervalSweep):
        return _interval(key, sweep, tags), {}
    raise ConfigError(f"hydra.sweeper.params.{key}={sweep} is not supported; use choice, range, interval or tag.")


def parse_expression(key: str, expression: Any) -> Param:
    """One `key: expression` (a string from YAML or the command line, or a plain YAML value)."""
    if not isinstance(expression, str):
        value = OmegaConf.to_container(expression) if isinstance(expression, DictConfig | ListConfig) else expression
        return Param(key, fixed=value)
    try:
        override: Override = OverridesParser.create().parse_overrides([f"{key}={expression}"])[0]
    except Exception as err:
        raise ConfigError(f"hydra.sweeper.params.{key}={expression!r} is not a valid sweep expression "
                          f"({str(err).splitlines()[0]}); see the syntax at the top of "
                          "segplat/conf/sweep/fusion_patch_lr.yaml.") from err
    if not override.is_sweep_override():
        return Param(key, fixed=override.value())
    sweep = override.value()
    dist, texts = _distribution(key, sweep)
    if isinstance(sweep, RangeSweep) and not sweep.shuffle and getattr(dist, "high", None) == sweep.stop:
        # the one place segplat's older reading (and Hydra's basic sweeper) differ: say it once per parameter
        log.info("hydra.sweeper.params.%s=%s draws up to and including %s, as hydra-optuna-sweeper's range does",
                 key, expression, format_value(sweep.stop))
    return Param(key, distribution=dist, texts=texts)


def parse_params(params: Mapping[str, Any]) -> list[Param]:
    """Parse `hydra.sweeper.params`; conditional parameters are ordered after what they depend on."""
    parsed: dict[str, Param] = {}
    for key, spec in params.items():
        key = str(key)
        if isinstance(spec, Mapping | DictConfig):
            spec = dict(spec)
            extra = set(spec) - {"when", "values"}
            if extra or "values" not in spec:
                raise ConfigError(f"hydra.sweeper.params.{key} must be an expression or {{when: {{KEY: VALUE}}, "
                                  f"values: EXPRESSION}}; found keys {sorted(spec)}.")
            param = parse_expression(key, spec["values"])
            when = spec.get("when") or {}
            if not isinstance(when, Mapping | DictConfig) or not when:
                raise ConfigError(f"hydra.sweeper.params.{key}.when must map config keys to values, e.g. "
                                  "{fusion.level: mid}.")
            for ref, allowed in dict(when).items():
                if isinstance(allowed, ListConfig):
                    allowed = OmegaConf.to_container(allowed)
                param.when[str(ref)] = list(allowed) if isinstance(allowed, list | tuple) else [allowed]
            parsed[key] = param
        else:
            parsed[key] = parse_expression(key, spec)
    # order: a parameter comes after the searched parameters its condition names
    ordered: list[Param] = []
    visiting: set[str] = set()

    def visit(p: Param) -> None:
        if p in ordered:
            return
        if p.key in visiting:
            raise ConfigError(f"hydra.sweeper.params.{p.key}.when forms a cycle of conditions; break it.")
        visiting.add(p.key)
        for ref in p.when:
            if ref == p.key:
                raise ConfigError(f"hydra.sweeper.params.{p.key}.when names the parameter itself; name another key.")
            if ref in parsed:
                visit(parsed[ref])
        visiting.discard(p.key)
        ordered.append(p)

    for p in parsed.values():
        visit(p)
    return ordered


def _matches(actual: Any, allowed: Sequence[Any], param: Param | None) -> bool:
    if param is not None:
        actual = param.python_value(actual)
    return any(actual == a or format_value(actual) == format_value(a) for a in allowed)


def config_value(config: DictConfig | None, key: str, default: Any = None) -> Any:
    """A key's value in the composed config; a config group's key gives the chosen option's name
    (`model` -> "unet"), as the override `model=unet` names it."""
    if config is None:
        return default
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None)
    if choices is not None and key in choices:
        return choices[key]
    value = OmegaConf.select(config, key, default=default)
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def is_active(param: Param, chosen: Mapping[str, Any], params: Mapping[str, Param], config: DictConfig | None) -> bool:
    """True when every condition of `param` holds for the values chosen so far (or the config's)."""
    for ref, allowed in param.when.items():
        if ref in params:
            if ref not in chosen:  # the parent itself is inactive
                return False
            if not _matches(chosen[ref], allowed, params[ref]):
                return False
            continue
        if config is None:
            return False
        actual = config_value(config, ref, default=MISSING)
        if actual is MISSING:
            raise ConfigError(f"hydra.sweeper.params.{param.key}.when names {ref}, which is neither a searched "
                              "parameter nor a config key; fix the key.")
        if not _matches(actual, allowed, None):
            return False
    return True


def suggest(trial: optuna.trial.Trial, params: Sequence[Param], config: DictConfig | None) -> dict[str, Any]:
    """The active parameters of one trial: key -> stored value (sampled ones and active fixed ones)."""
    by_key = {p.key: p for p in params}
    chosen: dict[str, Any] = {}
    for p in params:
        if not is_active(p, chosen, by_key, config):
            continue
        d = p.distribution
        if d is None:
            chosen[p.key] = p.fixed
        elif isinstance(d, optuna.distributions.CategoricalDistribution):
            chosen[p.key] = trial.suggest_categorical(p.key, d.choices)
        elif isinstance(d, optuna.distributions.IntDistribution):
            chosen[p.key] = trial.suggest_int(p.key, d.low, d.high, step=d.step, log=d.log)
        else:
            chosen[p.key] = trial.suggest_float(p.key, d.low, d.high, step=d.step, log=d.log)
    return chosen


def finite_values(param: Param, limit: float = 32) -> list[Any] | None:
    """Every value the parameter can take, or None when it has more than `limit` (a continuous interval)."""
    d = param.distribution
    if d is None:
        return [param.fixed]
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return list(d.choices)
    step = d.step if d.step is not None else (1 if isinstance(d, optuna.distributions.IntDistribution) else None)
    if step is None:
        return None
    n = round((d.high - d.low) / step) + 1
    if n > limit:
        return None
    values = [d.low + i * step for i in range(n)]
    return [int(v) for v in values] if isinstance(d, optuna.distributions.IntDistribution) else values


def trial_values(param: Param) -> list[Any]:
    """The values the space check tries: all of a finite parameter, both ends of a continuous one."""
    values = finite_values(param)
    return values if values is not None else [param.distribution.low, param.distribution.high]


def describe(param: Param) -> str:
    """What a parameter draws, in the sweep file's words (for error messages)."""
    d = param.distribution
    if d is None:
        return f"only {format_value(param.fixed)}"
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return "one of " + ", ".join(param.override_text(c) for c in d.choices)
    step = f" in steps of {d.step}" if d.step is not None else ""
    return f"{'integers' if isinstance(d, optuna.distributions.IntDistribution) else 'numbers'} from {d.low} to " \
           f"{d.high}{step}{' (log scale)' if d.log else ''}"


def contains(param: Param, value: Any) -> bool:
    """Whether a user's value (a baseline's, a condition's) is one the parameter can draw."""
    d = param.distribution
    if d is None:
        return _matches(param.fixed, [value], None)
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return any(_matches(choice, [value], param) for choice in d.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not d.low - 1e-12 <= value <= d.high + 1e-12:
        return False
    step = d.step if d.step is not None else (1 if isinstance(d, optuna.distributions.IntDistribution) else None)
    return step is None or abs((value - d.low) / step - round((value - d.low) / step)) < 1e-6


def stored_value(param: Param, value: Any) -> Any:
    """A user's value (a baseline's) as Optuna stores it: the matching choice itself for a choice."""
    d = param.distribution
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return next((c for c in d.choices if _matches(c, [value], param)), param.to_storage(value))
    return param.to_storage(value)


def draws(params: Sequence[Param], config: DictConfig | None,
          values: Callable[[Param], Sequence[Any]]) -> Iterator[dict[str, Any]]:
    """Every assignment of the active parameters (conditions followed as `suggest` follows them), each
    parameter taking `values(param)`; lazily, in the order a product of the values would list them."""
    by_key = {p.key: p for p in params}
    chosen: dict[str, Any] = {}

    def extend(i: int) -> Iterator[dict[str, Any]]:
        if i == len(params):
            yield dict(chosen)
            return
        p = params[i]
        if not is_active(p, chosen, by_key, config):
            yield from extend(i + 1)
            return
        for value in values(p):
            chosen[p.key] = value
            yield from extend(i + 1)
            del chosen[p.key]

    yield from extend(0)


def grid_space(params: Sequence[Param]) -> dict[str, list[Any]]:
    """The grid of a grid sampler: choices and ranges only (an interval has no grid)."""
    grid: dict[str, list[Any]] = {}
    for p in params:
        if p.distribution is None:
            continue
        values = finite_values(p, limit=math.inf)
        if values is None:
            raise ConfigError(f"hydra.sweeper.params.{p.key} is a continuous interval, which the grid sampler "
                              "cannot enumerate; use choice(...) or range(...), or another sampler.")
        grid[p.key] = values
    return grid
