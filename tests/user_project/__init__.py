"""A user's project as it lives outside segplat: the package `tinyproj` and its config folder `conf/`.

segplat never imports it. Tests put this folder on the path (`on_path`, or PYTHONPATH for subprocesses) and give
`conf/` to each command as a user does (`hydra.searchpath=[file://...]`, `searchpath=[...]`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

USER_PROJECT = Path(__file__).resolve().parent
USER_CONF = USER_PROJECT / "conf"
SEARCHPATH = f"hydra.searchpath=[file://{USER_CONF}]"


def on_path(monkeypatch) -> None:
    """Make `tinyproj` importable in this process, as `pip install -e .` would in the user's environment."""
    monkeypatch.syspath_prepend(str(USER_PROJECT))
    for name in [m for m in sys.modules if m == "tinyproj" or m.startswith("tinyproj.")]:
        monkeypatch.delitem(sys.modules, name)


def subprocess_env(repo: Path, project: Path = USER_PROJECT, **extra: str) -> dict[str, str]:
    """The environment of a task run in the user's project: the worktree's segplat first, then the user's package."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(project)]), "PYTHONUNBUFFERED": "1", **extra}
