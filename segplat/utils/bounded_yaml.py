"""YAML that segplat did not just write itself (a checkpoint's stored config, a run folder's config.yaml), parsed
within bounds.

YAML aliases let a few hundred bytes stand for 10^9 values (a "billion laughs": `a: &a [x, x, ...]`,
`b: &b [*a, *a, ...]`, ...). The parser shares the aliased objects, so parsing is quick, but every walk over the
result (checking targets, flattening, OmegaConf) visits each value once per path: the walk never ends. So the text
is refused above `MAX_BYTES`, and the parsed document above `MAX_VALUES` values counted as a walk would meet them
(shared objects once per reference; counted with memoisation, so counting is linear in the text). A self-containing
alias and nesting beyond the parser's depth limit are refused too. A run's resolved config is a few thousand values.
"""

from __future__ import annotations

from typing import Any

import yaml

from segplat.errors import SegplatError

MAX_BYTES = 1 << 20
MAX_VALUES = 1_000_000
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml limits nesting depth (1000) in C


class _TooLarge(Exception):
    pass


def load_bounded(text: str, what: str, error: type[SegplatError], fix: str) -> Any:
    """The plain data of `text`, or `error` with one sentence: "`what` ...; `fix`"."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_BYTES:
        raise error(f"{what} is {size / 2**20:.1f} MiB of YAML, more than the {MAX_BYTES // 2**20} MiB a run's config "
                    f"can be, so it was not read; {fix}")
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise error(f"{what} is not valid YAML ({reason}); {fix}") from err
    except RecursionError as err:
        raise error(f"{what} nests its YAML too deeply to be a run's config; {fix}") from err
    try:
        expanded_size(data)
    except _TooLarge as err:
        raise error(f"{what} {err}, so it was not read; {fix}") from None
    return data


def expanded_size(data: Any, limit: int = MAX_VALUES) -> int:
    """How many values a walk over `data` meets (an object reached through several aliases counts each time)."""
    sizes: dict[int, int] = {}
    open_now: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_now:
            raise _TooLarge("holds a YAML alias that contains itself (a walk over it would never end)")
        open_now.add(key)
        total = 1
        for child in (node.items() if isinstance(node, dict) else node):
            total += size(child[0]) + size(child[1]) if isinstance(node, dict) else size(child)
            if total > limit:
                raise _TooLarge(f"expands through YAML aliases to more than {limit:,} values (a \"billion laughs\")")
        open_now.discard(key)
        sizes[key] = total
        return total

    try:
        return size(data)
    except RecursionError:
        raise _TooLarge("nests its YAML too deeply to be a run's config") from None
