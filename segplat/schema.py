"""Signatures are the schema: the types configs are checked against, and the one walker that checks them.

Every config node with a `_target_` names a class or function; its keyword arguments, with their type hints, are
what that node may hold. `check_targets(cfg)` walks every such node of a composed config before anything runs
(every task, `create_model` / `load_model`, each draw the sweeper checks) and refuses, in one sentence naming the
full key (`dataset.batch_size=-4 must be a positive integer.`):

- a key the target does not take (`extra` keys are forbidden; a target taking `**kwargs` takes any),
- a value of another type (checked strictly: `"no"` is not false, `2.5` is not an integer, `"3"` is not a number),
- a value outside its range or choices (`Annotated[int, Gt(0)]`, `Literal["once", "read", "off"]`),
- a key of a closed nested section (a dataclass marked with `section`) that the section does not have.

Types are declared once, on the constructor or factory the config targets, with the aliases below; a `Hint` in the
annotation adds what the value means to the refusal. pydantic (a dependency of wandb and MLflow already) checks
leaf values; the walk itself, sections and messages are segplat's, so every refusal is the project's one sentence
(`segplat.messages`). Targets outside segplat and the user's package (torch's optimisers) are checked for unknown
keys only: their hints are not written for configs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from omegaconf import DictConfig, ListConfig, OmegaConf

from segplat.errors import ConfigError
from segplat.messages import choices, first_line, must_be, not_a_key, not_known, sentence, show

# keys Hydra reads itself: never arguments of the target
HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})


@dataclasses.dataclass(frozen=True)
class Hint:
    """What a value means, added to its refusal: `Annotated[float, Ge(0), Le(1), Hint("0 = off, 1 = always")]`."""

    text: str


# -- the aliases constructors annotate with ---------------------------------------------------------------------
PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Probability = Annotated[float, Ge(0), Le(1)]
UnitInterval = Probability
OpenFraction = Annotated[float, Ge(0), Lt(1)]  # an overlap, a dropout rate: 1 would leave nothing


def section(cls: type) -> type:
    """Mark a dataclass as a closed nested config section: its fields are the only keys it takes, each checked
    against its type, and a refusal names the full key (`dataset.layout.modalities.rgb.nodta`)."""
    if "__dataclass_fields__" not in cls.__dict__:  # a subclass of a dataclass adds fields only once made one
        cls = dataclasses.dataclass(cls)
    cls.__segplat_section__ = True  # type: ignore[attr-defined]
    return cls


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and getattr(tp, "__segplat_section__", False)


def variants(key: str, table: Mapping[str, Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a factory whose keys depend on the value of one of them (`scheduler.kind`): the node takes the factory's
    own keys and those of `table[value]`'s signature; a key that only another value reads is refused naming it (and
    the config-group options that choose it), so no table of keys per value is written beside the signatures."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__segplat_variants__ = (key, dict(table))  # type: ignore[attr-defined]
        return fn

    return mark


# -- reading a target's signature ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    annotation: Any  # Any when the hint is missing or cannot be resolved
    default: Any = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Signature:
    target: str
    params: dict[str, Param]
    open: bool  # takes **kwargs that reach no further signature: any key is taken
    typed: bool  # segplat's own or the user's code: its hints are checked

    def keys(self) -> list[str]:
        return list(self.params)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The type hints of `fn` with their `Annotated` metadata; a hint that cannot be resolved (a name imported
    only for type checking) becomes Any rather than hiding the others."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        pass
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    namespace = dict(vars(module)) if module else {}
    out = {}
    for name, hint in getattr(fn, "__annotations__", {}).items():
        if isinstance(hint, str):
            try:
                hint = eval(hint, namespace)
            except Exception:
                hint = Any
        out[name] = hint
    return out


def _own_code(obj: Any) -> bool:
    """Hints are checked for everything but the libraries configs also name (torch, timm): theirs are not
    written as a config schema."""
    module = getattr(obj, "__module__", "") or ""
    return module.split(".")[0] not in {"torch", "timm", "torchvision", "transformers", "terratorch", "optuna"}


def _object(target: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as err:
        raise ConfigError(f"_target_={target} cannot be imported ({first_line(err)}); check the spelling, or "
                          "install the package that provides it.") from err


@functools.cache
def signature_of(target: str) -> Signature:
    """The keyword arguments a `_target_` takes, following `**kwargs` up a class's bases (a layout passes its
    own keys on to `Layout.__init__`)."""
    return _signature(target, _object(target))


def _signature(target: str, obj: Any) -> Signature:
    functions: list[Callable[..., Any]]
    if isinstance(obj, type):
        functions = [k.__dict__["__init__"] for k in obj.__mro__ if "__init__" in k.__dict__ and k is not object]
        if dataclasses.is_dataclass(obj) and not functions:
            functions = [obj.__init__]
    else:
        functions = [obj]
    params: dict[str, Param] = {}
    open_ = not functions
    for fn in functions:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: take anything
            open_ = True
            break
        hints = _hints(fn)
        for p in sig.parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in params:
                continue
            if p.kind == p.POSITIONAL_ONLY:
                continue
            params[p.name] = Param(p.name, hints.get(p.name, Any), p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            open_ = False
            break
        open_ = True  # **kwargs: the next class up the MRO says what they may be
    return Signature(target, params, open_, _own_code(obj))


@functools.cache
def variants_of(target: str) -> tuple[str, dict[str, Signature]] | None:
    """For a factory marked with `variants`: (its key, value -> the node's whole signature for that value)."""
    marked = getattr(_object(target), "__segplat_variants__", None)
    if marked is None:
        return None
    key, table = marked
    base = signature_of(target)
    out = {}
    for value, fn in table.items():
        own = _signature(target, fn)
        out[value] = Signature(target, {**base.params, **own.params}, own.open, base.typed)
    return key, out


@functools.cache
def _options_choosing(group: str, target: str, key: str, value: str) -> tuple[str, ...]:
    """The shipped options of config group `group` (`scheduler`) whose node is `target` with `key=value`."""
    from omegaconf import OmegaConf

    from segplat.config import CONF_DIR

    folder = CONF_DIR.joinpath(*group.split("."))
    found = []
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        node = OmegaConf.load(path)
        if node.get("_target_") == target and str(node.get(key)) == value:
            found.append(f"{group}={path.stem}")
    return tuple(found)


def _foreign_key(path: str, name: str, target: str, key: str, value: Any,
                 table: Mapping[str, Signature]) -> str | None:
    """The refusal of `name`, a key only other values of `key` read, naming them and the options that choose them."""
    readers = [v for v, sig in table.items() if v != value and name in sig.params]
    if not readers:
        return None
    options = [o for v in readers for o in _options_choosing(path, target, key, v)] or [
        f"{path}.{key}={v}" for v in readers]
    return sentence(f"{path}.{name} does nothing for {path}.{key}={show(value)}; it belongs to "
                    f"{choices(options)}; remove it")


# -- describing and checking a type -----------------------------------------------------------------------------
def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """(the type under Annotated, its metadata)."""
    meta: list[Any] = []
    while get_origin(tp) is Annotated:
        args = get_args(tp)
        tp, meta = args[0], [*meta, *args[1:]]
    return tp, meta


def _members(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def hint_of(tp: Any) -> str | None:
    texts = [m.text for m in _strip(tp)[1] if isinstance(m, Hint)]
    for member in _members(_strip(tp)[0]):
        texts += [m.text for m in _strip(member)[1] if isinstance(m, Hint)]
    return "; ".join(dict.fromkeys(texts)) or None


def _bounds(meta: Sequence[Any]) -> tuple[Any, bool, Any, bool]:
    lo = hi = None
    lo_open = hi_open = False
    for m in meta:
        if isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Ge):
            lo, lo_open = m.ge, False
        elif isinstance(m, Lt):
            hi, hi_open = m.lt, True
        elif isinstance(m, Le):
            hi, hi_open = m.le, False
    return lo, lo_open, hi, hi_open


def describe(tp: Any) -> str:
    """What a value of type `tp` is, in words: `a positive integer`, `a number from 0 to 1`, `true or false`."""
    base, meta = _strip(tp)
    members = _members(base)
    if len(members) > 1:
        parts = [describe(m) for m in members if m is not type(None)]
        if type(None) in members:
            parts.append("null")
        return " or ".join(dict.fromkeys(parts))
    if base is type(None):
        return "null"
    if get_origin(base) is Literal:
        return "one of " + ", ".join(show(v) for v in get_args(base))
    lo, lo_open, hi, hi_open = _bounds(meta)
    noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base)
    if base is str and any(isinstance(m, MinLen) and m.min_length > 0 for m in meta):
        noun = "a non-empty string"
    if noun is None:
        return _describe_container(base, meta)
    if base in (int, float) and (lo is not None or hi is not None):
        kind, a = ("integer", "an") if base is int else ("number", "a")
        if lo == 0 and hi is None:
            return f"a positive {kind}" if lo_open else f"{a} {kind}, 0 or more"
        if lo is not None and hi is not None:
            if not lo_open and not hi_open:
                return f"{a} {kind} from {show(lo)} to {show(hi)}"
            left = f"above {show(lo)}" if lo_open else f"of at least {show(lo)}"
            right = f"below {show(hi)}" if hi_open else f"at most {show(hi)}"
            return f"{a} {kind} {left} and {right}"
        if lo is not None:
            return f"{a} {kind} {'above' if lo_open else 'of at least'} {show(lo)}"
        return f"{a} {kind} {'below' if hi_open else 'of at most'} {show(hi)}"
    return noun


def _describe_container(base: Any, meta: Sequence[Any] = ()) -> str:
    origin = get_origin(base) or base
    args = get_args(base)
    if is_section(base):
        return f"a section with the keys {', '.join(f.name for f in dataclasses.fields(base))}"
    if origin in (list, tuple, set, frozenset, Sequence) or (isinstance(origin, type) and issubclass(
            origin, Sequence) and origin is not str):
        least = max((m.min_length for m in meta if isinstance(m, MinLen)), default=0)
        kind, size = ("a non-empty list", "") if least == 1 else ("a list", f"at least {least} " if least else "")
        if origin is tuple and args and args[-1] is not Ellipsis:
            size = f"{len(args)} "
        return f"{kind} of {size}{_plural(args[0])}" if args and args[0] is not Ellipsis else kind
    if origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return f"a mapping of names to {_plural(args[1])}" if len(args) == 2 else "a mapping"
    if base is Any:
        return "any value"
    return f"a {getattr(base, '__name__', str(base))}"


def _plural(tp: Any) -> str:
    text = describe(tp)
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                      ("a positive integer", "positive integers"), ("a positive number", "positive numbers"),
                      ("a list", "lists"), ("a mapping", "mappings")):
        if text.startswith(one):
            return many + text[len(one):]
    return text


def _literal_options(tp: Any) -> list[Any] | None:
    """The choices of a Literal (with null when optional), or None when `tp` is not a plain choice."""
    base, _ = _strip(tp)
    options: list[Any] = []
    for member in _members(base):
        member, _ = _strip(member)
        if member is type(None):
            options.append(None)
        elif get_origin(member) is Literal:
            options += list(get_args(member))
        else:
            return None
    return options or None


@functools.cache
def _adapter(tp: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


def _accepts(tp: Any, value: Any) -> bool:
    from pydantic import ValidationError

    try:
        _adapter(tp).validate_python(value, strict=True)
    except ValidationError:
        # configs write tuples as lists (`betas: [0.9, 0.999]`) and paths as text; strict checking refuses both
        if isinstance(value, list):
            return _accepts(tp, _tuples(value))
        return isinstance(value, str) and _takes_path(tp) and _accepts_text_path(tp, value)
    except Exception:  # a hint pydantic cannot build a validator for (an arbitrary class): its shape only
        return _shape_fits(tp, value)
    return True


def _shape_fits(tp: Any, value: Any) -> bool:
    """Whether `value` has the container shape of some member of `tp` (a mapping for `Mapping[str, nn.Module]`, a
    list for a sequence; null where optional); members that are arbitrary classes take anything (a `_target_`)."""
    for member in _members(_strip(tp)[0]):
        base = _strip(member)[0]
        origin = get_origin(base) or base
        if base is type(None):
            if value is None:
                return True
        elif isinstance(origin, type) and issubclass(origin, Mapping):
            if isinstance(value, Mapping):
                return True
        elif isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str:
            if isinstance(value, list | tuple):
                return True
        else:
            return True
    return False


def _tuples(value: Any) -> Any:
    """Lists as tuples, all the way down (the shape a `tuple[...]` hint checks)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _takes_path(tp: Any) -> bool:
    from pathlib import PurePath

    return any(isinstance(_strip(m)[0], type) and issubclass(_strip(m)[0], PurePath) for m in _members(_strip(tp)[0]))


def _accepts_text_path(tp: Any, value: str) -> bool:
    from pydantic import ValidationError

    try:
        _adapter(tp).validate_python(value, strict=False)
    except ValidationError:
        return False
    return True


def _section_in(tp: Any, value: Any = None) -> tuple[str, Any] | None:
    """Where a closed section sits in `tp`: ("self" | "items" | "values", section type), or None. In a union with
    other types (`PositiveInt | PerSensor`), the section is the one a mapping (or list) value means."""
    base, _ = _strip(tp)
    members = [m for m in _members(base) if m is not type(None)]
    found = []
    for member in members:
        inner, _ = _strip(member)
        origin, args = get_origin(inner), get_args(inner)
        if is_section(inner):
            found.append(("self", inner))
        elif origin in (list, tuple, Sequence) and args and is_section(_strip(args[0])[0]):
            found.append(("items", _strip(args[0])[0]))
        elif origin in (dict, Mapping) and len(args) == 2 and is_section(_strip(args[1])[0]):
            found.append(("values", _strip(args[1])[0]))
    if len(members) == 1:
        return found[0] if found else None
    for kind, cls in found:
        if isinstance(value, list) if kind == "items" else isinstance(value, Mapping):
            return kind, cls
    return None


def check_value(key: str, tp: Any, value: Any) -> None:
    """Refuse `value` for `key` unless it is of type `tp` (strictly), recursing into closed sections."""
    if tp is Any or tp is inspect.Parameter.empty or _is_target(value) or value == "???":
        return
    where = _section_in(tp, value)
    if where is not None and value is not None:
        kind, cls = where
        if kind == "self" and isinstance(value, Mapping):
            return check_section(key, cls, value)
        if kind == "items" and isinstance(value, list):
            for i, item in enumerate(value):
                check_value(f"{key}[{i}]", cls, item)
            return
        if kind == "values" and isinstance(value, Mapping):
            for name, item in value.items():
                check_value(f"{key}.{name}", cls, item)
            return
    if _accepts(tp, value):
        return
    options = _literal_options(tp)
    if options is not None and not isinstance(value, list | dict):
        raise ConfigError(not_known(key, value, options, hint_of(tp)))
    raise ConfigError(must_be(key, value, describe(tp), hint_of(tp)))


def check_section(key: str, cls: type, value: Mapping[str, Any]) -> None:
    """A closed section: only its fields, each of its type (`key` "" for a task's top-level keys)."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name, item in value.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in names:
            raise ConfigError(not_a_key(full, key, names))
        check_value(full, hints.get(name, Any), item)


S = typing.TypeVar("S")


def build_section(cls: type[S], value: Mapping[str, Any] | S | None) -> S:
    """A section's dataclass from its config mapping (checked by the walker before), nested sections included, or
    its defaults for null."""
    if isinstance(value, cls):
        return value
    from segplat.utils.plain import to_plain

    hints = _hints(cls)
    given = dict(to_plain(value) or {})
    for name, item in given.items():
        where = _section_in(hints.get(name, Any), item)
        if where is None or item is None:
            continue
        kind, inner = where
        if kind == "self" and isinstance(item, Mapping):
            given[name] = build_section(inner, item)
        elif kind == "items" and isinstance(item, list):
            given[name] = [build_section(inner, v) for v in item]
        elif kind == "values" and isinstance(item, Mapping):
            given[name] = {k: build_section(inner, v) for k, v in item.items()}
    return cls(**given)


def _is_target(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


# -- the walker ---------------------------------------------------------------------------------------------------
def target_nodes(tree: Any, path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(full key, node) of every mapping with a `_target_`, outermost first."""
    if isinstance(tree, Mapping):
        if "_target_" in tree:
            yield path, tree
        for key, value in tree.items():
            if isinstance(key, str) and key.startswith("_") and key in HYDRA_KEYS:
                continue
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from target_nodes(value, f"{path}[{i}]")


def check_node(path: str, node: Mapping[str, Any]) -> None:
    """One `_target_` node against its target's signature."""
    target = str(node["_target_"])
    try:
        sig = signature_of(target)
        chosen = variants_of(target)
    except ConfigError as err:
        raise ConfigError(f"{path}.{err}" if path else str(err)) from None
    table: Mapping[str, Signature] = {}
    if chosen is not None:  # the keys a value of the deciding key (`kind`) reads
        by, table = chosen
        value = node.get(by, sig.params[by].default)
        check_value(f"{path}.{by}" if path else by, Literal[tuple(table)], value)
        sig = table[value]
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        full = f"{path}.{key}" if path else str(key)
        param = sig.params.get(str(key))
        if param is None:
            if sig.open:
                continue
            foreign = _foreign_key(path, str(key), target, by, node.get(by, sig.params[by].default),
                                   table) if table else None
            raise ConfigError(foreign or not_a_key(full, path, sig.keys()))
        if sig.typed:
            check_value(full, param.annotation, value)


def plain_config(cfg: Any) -> Any:
    """The config as plain Python with interpolations resolved where they can be (a `${hydra:...}` outside a
    running app stays as written)."""
    if not isinstance(cfg, DictConfig | ListConfig):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:
        pass
    if isinstance(cfg, ListConfig):
        return [plain_config(v) for v in cfg]
    out: dict[str, Any] = {}
    for key in cfg:
        try:
            out[str(key)] = plain_config(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
        except Exception:
            out[str(key)] = OmegaConf.to_container(cfg, resolve=False)[key]
    return out


def check_targets(cfg: Any, root: str = "", skip: Sequence[str] = ("hydra",)) -> None:
    """Every `_target_` node of `cfg` (a composed config or any section of one, mounted at `root`) against its
    target's signature; the first wrong key stops with one sentence naming its full key."""
    tree = plain_config(cfg)
    if isinstance(tree, Mapping):
        tree = {k: v for k, v in tree.items() if k not in skip}
    for path, node in target_nodes(tree, root):
        check_node(path, node)
