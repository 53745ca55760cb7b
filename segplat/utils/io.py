"""Atomic file writes (a crash mid-write never leaves a file that reads as complete) and strict JSON.

Every JSON file segplat writes (metrics.jsonl, summary.json, evaluate's metrics.json, the sweep summary,
inspect's summary, store markers) goes through `dumps_json`: a NaN or infinite float (the IoU of a class
that is absent from a split) is written as `null`, because bare `NaN` is not JSON and strict readers (jq,
JavaScript, dashboards) reject the file. `loads_json` / `read_jsonl` read both forms back, turning `null`
values of a metrics record into NaN again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a written file gets the mode open() would give it
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj, indent=2) + "\n")


def json_safe(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`obj` as plain JSON values: NaN and infinities become None; arrays, tensors and numpy scalars become
    lists and numbers; paths become strings; anything else is `default(obj)`, or refused without one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str | int | float | bool) and k is not None else k: json_safe(v, default)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, default) for v in obj]
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(obj.tolist(), default)
    if hasattr(obj, "item"):
        return json_safe(obj.item(), default)
    if default is not None:
        return json_safe(default(obj))
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def dumps_json(obj: Any, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """Strict JSON text of `obj` (non-finite floats as null; `allow_nan=False` proves no bare NaN is left);
    `default` converts what JSON has no type for (e.g. `str`), as in `json.dumps`."""
    return json.dumps(json_safe(obj, default), allow_nan=False, **kwargs)


def loads_json(text: str, null_as_nan: bool = False) -> Any:
    """Parse JSON written by segplat now (null) or before (bare NaN); with `null_as_nan`, the null values of a
    top-level object (a metrics record) become NaN, so the reader sees the numbers it always saw."""
    obj = json.loads(text)
    if null_as_nan and isinstance(obj, dict):
        obj = {k: (math.nan if v is None else v) for k, v in obj.items()}
    return obj


def read_jsonl(path: str | os.PathLike, null_as_nan: bool = True) -> list[dict[str, Any]]:
    """The records of a .jsonl file (metrics.jsonl); a line torn by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(loads_json(line, null_as_nan))
        except json.JSONDecodeError:
            continue
    return records
