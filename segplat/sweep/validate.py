"""Check a whole search space before the first trial is asked, so a broken space costs no trial.

A trial that dies on a misspelt key or on a model x fusion combination the model refuses spends a
budget slot, a process start and a FAIL row in the study, and only its stderr.log says why. So the
sweeper first composes the configurations its trials would compose (Hydra's `compose` with the
sweep's fixed overrides plus a draw) and runs on each the same `segplat.config.check_config` that
the train task runs before it reads data: the sweep and its trials cannot disagree. Nothing is
written anywhere; the first problem found stops the sweep with one sentence.

Checked, in order:
- every `when:` key is a searched parameter (a finite one, and the values named are ones it draws)
  or a key of the composed config;
- every parameter names a key of the composed config or a config group (with a "did you mean" for a
  near miss); a numeric distribution sits on a numeric key, and no float is drawn for an integer key;
- every draw the space can make composes and passes check_config: each combination of the finite
  parameters' values, following the conditions as the sampler does, with a continuous parameter at
  both ends of its range. When the space has more than `max_draws` draws, every combination of the
  parameters that decide the model and its fusion (config groups, `model.*`, `fusion.*`,
  `dataset.modalities`) is checked, and every value of each other parameter once;
- every parameter is searched in at least one draw (a condition that can never hold is an error);
- every baseline sets searched parameters that are active in it, to values they can take, and its
  draw composes and passes check_config.

Config groups are composed (`model=cmx` changes the defaults tree), once per combination of group
choices; value parameters are then set on a copy with `OmegaConf.update(..., merge=True)`, which is
how Hydra applies a `key=value` override to the composed config.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from segplat.errors import ConfigError, SegplatError
from segplat.messages import did_you_mean as nearest
from segplat.messages import first_line
from segplat.sweep import space as sp

log = logging.getLogger(__name__)

Compose = Callable[[Sequence[str]], DictConfig]
# keys whose combinations decide which model is built and how its inputs are fused
STRUCTURAL_PREFIXES = ("model.", "fusion.", "dataset.modalities")
MAX_DRAWS = 512
MAX_STRUCTURAL_DRAWS = 20000
REFUSALS_SHOWN = 3


def _paths(tree: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a plain config tree (lists by index), for "did you mean"."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path
        yield from _paths(value, path)


def _lookup(tree: Any, key: str) -> Any:
    """The value at a dotted key of a plain config tree, or space.MISSING."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return sp.MISSING
    return node


def did_you_mean(key: str, candidates: Sequence[str]) -> str:
    """` (did you mean x?)` for the closest candidate, compared as a whole and by the last part."""
    close = nearest(key, candidates)
    if close is None and "." in key:
        parent, last = key.rsplit(".", 1)
        siblings = [c.rsplit(".", 1)[1] for c in candidates if c.startswith(parent + ".") and
                    "." not in c[len(parent) + 1:]]
        sibling = nearest(last, siblings)
        close = f"{parent}.{sibling}" if sibling is not None else None
    return f" (did you mean {close}?)" if close else ""


def _leaves(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, dict | list):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def _template(cfg: DictConfig, tree: Any) -> DictConfig:
    """The config a draw is set on: the composed one without Hydra's node, each interpolation that cannot resolve
    before the run (the run folder, `${hydra:...}`) made literal text. The checks see the same text either way
    (they never resolve it), but one unresolvable value made every check resolve the whole config node by node,
    about a second per draw on a busy machine."""
    template = copy.deepcopy(tree)
    for path, value in _leaves(tree):
        if not (isinstance(value, str) and "${" in value):
            continue
        try:
            OmegaConf.select(cfg, ".".join(map(str, path)), throw_on_resolution_failure=True)
        except Exception:
            node = template
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value.replace("${", "\\${")
    out = OmegaConf.create(template)
    OmegaConf.set_struct(out, True)  # as Hydra composes it: a key the checks read that does not exist raises
    return out


@dataclass
class SpaceReport:
    """What was checked, for the sweeper's log line."""

    draws: int = 0
    compositions: int = 0
    exhaustive: bool = True
    refused: list[tuple[str, str]] = field(default_factory=list)  # (draw text, reason)


class SpaceChecker:
    """Validates `params` (parsed by space.parse_params) against the trials' composed configs.

    `compose(overrides)` must compose the task's config exactly as a trial with those overrides would
    (with the `hydra` node, for the chosen config groups); `fixed` are the overrides every trial gets;
    `config` is the config the sweeper evaluates `when:` conditions on; `group_options(group)` lists a
    config group's options (for "did you mean"); `check` is the task's own pre-data check.
    """

    def __init__(self, params: Sequence[sp.Param], fixed: Sequence[str], compose: Compose,
                 config: DictConfig | None = None, check: Callable[[DictConfig], None] | None = None,
                 group_options: Callable[[str], Sequence[str]] | None = None, max_draws: int = MAX_DRAWS) -> None:
        if check is None:
            from segplat.config import check_config as check
        self.params = list(params)
        self.by_key = {p.key: p for p in self.params}
        self.fixed = list(fixed)
        self.compose_fn = compose
        self.check_fn = check
        self.group_options = group_options
        self.max_draws = max_draws
        self.report = SpaceReport()
        self._bases: dict[tuple[str, ...], tuple[DictConfig, Any]] = {}
        self._templates: dict[tuple[str, ...], DictConfig] = {}  # what each draw is set on (see _template)
        self._key_problems: dict[tuple[tuple[str, ...], str], str | None] = {}
        self.base, self.base_tree = self._compose(())
        self.config = config if config is not None else self.base
        choices = OmegaConf.select(self.base, "hydra.runtime.choices", default=None)
        self.groups = set(choices.keys()) if choices is not None else set()

    # -- composition --------------------------------------------------------------------------------
    def _compose(self, group_overrides: tuple[str, ...]) -> tuple[DictConfig, Any]:
        """The config composed with the fixed overrides and these group choices (cached), and its plain tree."""
        if group_overrides not in self._bases:
            try:
                cfg = self.compose_fn([*self.fixed, *group_overrides])
            except SegplatError:
                raise
            except Exception as err:
                raise self._composition_error(group_overrides, err) from None
            self.report.compositions += 1
            tree = OmegaConf.to_container(cfg, resolve=False)
            tree.pop("hydra", None)
            self._bases[group_overrides] = (cfg, tree)
            self._templates[group_overrides] = _template(cfg, tree)
        return self._bases[group_overrides]

    def _composition_error(self, group_overrides: tuple[str, ...], err: Exception) -> ConfigError:
        for override in group_overrides:
            group, option = override.split("=", 1)
            options = list(self.group_options(group)) if self.group_options is not None else []
            if options and option not in options:
                return ConfigError(f"the sweep parameter {group} can draw {override}, which is not an option of the "
                                   f"{group} config group{did_you_mean(option, options)}; choose among "
                                   f"{', '.join(options)}.")
        if not group_overrides:
            return ConfigError(f"the sweep's fixed overrides {' '.join(self.fixed)} do not compose "
                               f"({first_line(err)}); fix them.")
        return ConfigError(f"the sweep draw {' '.join(group_overrides)} does not compose ({first_line(err)}); "
                           "fix hydra.sweeper.params.")

    def _key_problem(self, group_overrides: tuple[str, ...], tree: Any, param: sp.Param) -> str | None:
        """Why a value parameter cannot be set on this composed config (None when it can)."""
        cache_key = (group_overrides, param.key)
        if cache_key in self._key_problems:
            return self._key_problems[cache_key]
        problem = None
        value = _lookup(tree, param.key)
        d = param.distribution
        where = f" with {' '.join(group_overrides)}" if group_overrides else ""
        if value is sp.MISSING:
            hint = did_you_mean(param.key, [*_paths(tree), *sorted(self.groups)])
            problem = (f"the sweep parameter {param.key} names no key of the composed config{where}{hint}; fix its "
                       "name in hydra.sweeper.params or on the command line.")
        elif isinstance(d, optuna.distributions.IntDistribution | optuna.distributions.FloatDistribution):
            interpolated = isinstance(value, str) and (value.startswith("${") or value == "???")
            if not interpolated and (isinstance(value, bool) or not isinstance(value, int | float | None)):
                problem = (f"the sweep parameter {param.key} draws numbers, but {param.key} is "
                           f"{sp.format_value(value)} in the composed config{where}; search it with choice(...).")
            elif isinstance(d, optuna.distributions.FloatDistribution) and isinstance(value, int) and not \
                    isinstance(value, bool):
                problem = (f"the sweep parameter {param.key} draws floats, but {param.key} is an integer "
                           f"({value}) in the composed config{where}; search it with range(...) or "
                           "tag(int, interval(...)).")
        self._key_problems[cache_key] = problem
        return problem

    def draw_text(self, draw: Mapping[str, Any]) -> str:
        return " ".join(f"{k}={self.by_key[k].override_text(v)}" for k, v in draw.items()
                        if self.by_key[k].distribution is not None) or "(fixed values only)"

    def check_draw(self, draw: Mapping[str, Any]) -> None:
        """Compose one draw and run the task's check; a refusal is recorded, a broken key raises."""
        group_overrides = tuple(f"{k}={self.by_key[k].override_text(v)}" for k, v in draw.items() if k in self.groups)
        _, tree = self._compose(group_overrides)
        # the composed config once per group choice; a draw's values are set on a copy as a `key=value` override
        # merges into the composed config (the task function gets it without Hydra's node)
        cfg = copy.deepcopy(self._templates[group_overrides])
        parser = OverridesParser.create()
        for key, value in draw.items():
            if key in self.groups:
                continue
            problem = self._key_problem(group_overrides, tree, self.by_key[key])
            if problem:
                raise ConfigError(problem)
            text = self.by_key[key].override_text(value)
            OmegaConf.update(cfg, key, parser.parse_overrides([f"{key}={text}"])[0].value(), merge=True)
        self.report.draws += 1
        try:
            self.check_fn(cfg)
        except SegplatError as err:
            self.report.refused.append((self.draw_text(draw), str(err)))
        except Exception as err:  # the trial would crash the same way
            self.report.refused.append((self.draw_text(draw), f"{type(err).__name__}: {first_line(err)}"))

    # -- the checks ---------------------------------------------------------------------------------
    def check_conditions(self) -> None:
        for p in self.params:
            for ref, allowed in p.when.items():
                where = f"hydra.sweeper.params.{p.key}.when"
                if ref in self.by_key:
                    parent = self.by_key[ref]
                    if parent.distribution is not None and sp.finite_values(parent) is None:
                        raise ConfigError(f"{where} names {ref}, a continuous parameter, which almost never equals a "
                                          "given value; condition on a choice(...) or range(...) parameter.")
                    never = [a for a in allowed if not sp.contains(parent, a)]
                    if never:
                        raise ConfigError(f"{where} asks for {ref}={sp.format_value(never[0])}, which {ref} never "
                                          f"draws ({sp.describe(parent)}); fix the value.")
                elif sp.config_value(self.config, ref, default=sp.MISSING) is sp.MISSING:
                    hint = did_you_mean(ref, [*self.by_key, *_paths(self.base_tree), *sorted(self.groups)])
                    raise ConfigError(f"{where} names {ref}, which is neither a searched parameter nor a config "
                                      f"key{hint}; fix the key.")

    def _ancestors(self, key: str) -> set[str]:
        out: set[str] = set()
        stack = [key]
        while stack:
            for ref in self.by_key[stack.pop()].when:
                if ref in self.by_key and ref not in out:
                    out.add(ref)
                    stack.append(ref)
        return out

    def _draws(self, vary: set[str] | None) -> Iterator[dict[str, Any]]:
        """Draws in which the parameters in `vary` (all when None) take every trial value, the others their first."""
        def values(p: sp.Param) -> Sequence[Any]:
            all_values = sp.trial_values(p)
            return all_values if vary is None or p.key in vary else all_values[:1]

        return sp.draws(self.params, self.config, values)

    def draws_to_check(self) -> Iterator[dict[str, Any]]:
        everything = list(itertools.islice(self._draws(None), self.max_draws + 1))
        if len(everything) <= self.max_draws:
            yield from everything
            return
        self.report.exhaustive = False
        structural = {p.key for p in self.params if p.key in self.groups or p.key.startswith(STRUCTURAL_PREFIXES)}
        structural |= set().union(*(self._ancestors(k) for k in structural)) if structural else set()
        for i, draw in enumerate(self._draws(structural)):
            if i == MAX_STRUCTURAL_DRAWS:
                log.warning("the search space has more than %d model/fusion combinations; only the first %d were "
                            "checked before the first trial", MAX_STRUCTURAL_DRAWS, MAX_STRUCTURAL_DRAWS)
                break
            yield draw
        for p in self.params:
            if p.key in structural or p.distribution is None:
                continue
            needed = {repr(v) for v in sp.trial_values(p)}
            for draw in self._draws(structural | {p.key} | self._ancestors(p.key)):
                if p.key in draw and repr(draw[p.key]) in needed:
                    needed.discard(repr(draw[p.key]))
                    yield draw
                    if not needed:
                        break

    def baseline_draws(self, baselines: Sequence[Any]) -> list[dict[str, Any]]:
        """Each baseline as stored values, after checking it names searched, active keys and drawable values."""
        out = []
        for i, baseline in enumerate(baselines):
            where = f"hydra.sweeper.baselines[{i}]"
            if not isinstance(baseline, Mapping):
                raise ConfigError(f"{where} must be a map of searched keys to values.")
            searched = {p.key for p in self.params if p.distribution is not None}
            unknown = sorted(set(map(str, baseline)) - searched)
            if unknown:
                raise ConfigError(f"{where} sets {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
                                  "not searched; search it in hydra.sweeper.params or drop it from the baseline.")
            fixed = {}
            for key, value in baseline.items():
                param = self.by_key[str(key)]
                if not sp.contains(param, value):
                    raise ConfigError(f"{where}.{key}={sp.format_value(value)} is not a value {key} draws "
                                      f"({sp.describe(param)}); use one it draws or drop it from the baseline.")
                fixed[str(key)] = sp.stored_value(param, value)
            def values(p: sp.Param, fixed: dict[str, Any] = fixed) -> list[Any]:
                return [fixed[p.key]] if p.key in fixed else sp.trial_values(p)[:1]

            draw = next(iter(sp.draws(self.params, self.config, values)))
            inactive = sorted(set(fixed) - set(draw))
            if inactive:
                raise ConfigError(f"{where} sets {', '.join(inactive)}, which the baseline's other values leave "
                                  "unsearched (its when: condition does not hold); drop it from the baseline.")
            out.append(fixed)
            self.check_draw(draw)
        return out

    def run(self, baselines: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """All checks; returns the baselines as the fixed params to enqueue. Raises ConfigError."""
        self.check_conditions()
        seen: set[str] = set()
        for draw in self.draws_to_check():
            seen.update(draw)
            self.check_draw(draw)
        never = [p.key for p in self.params if p.distribution is not None and p.key not in seen]
        if never:
            p = self.by_key[never[0]]
            conditions = ", ".join(f"{k}={sp.format_value(v[0]) if len(v) == 1 else v}" for k, v in p.when.items())
            raise ConfigError(f"hydra.sweeper.params.{p.key} is never searched: its condition ({conditions}) holds "
                              "in no draw of the space; fix the condition or drop the parameter.")
        fixed_baselines = self.baseline_draws(baselines)
        self.raise_refusals()
        return fixed_baselines

    def raise_refusals(self) -> None:
        refused = self.report.refused
        if not refused:
            return
        by_reason: dict[str, list[str]] = {}
        for draw, reason in refused:
            by_reason.setdefault(reason, []).append(draw)
        shown = "; ".join(f"[{draws[0]}]{f' and {len(draws) - 1} more' if len(draws) > 1 else ''}: "
                          f"{reason.rstrip('.')}" for reason, draws in itertools.islice(by_reason.items(),
                                                                                          REFUSALS_SHOWN))
        more = f"; and {len(by_reason) - REFUSALS_SHOWN} other reasons" if len(by_reason) > REFUSALS_SHOWN else ""
        raise ConfigError(f"the search space can draw {len(refused)} of {self.report.draws} checked configurations "
                          f"that the task refuses before training: {shown}{more}; remove those choices or add when: "
                          "conditions to hydra.sweeper.params so they are never drawn.")
