"""The config folders a command reads: segplat's own (`segplat/conf`, inside the package) and the user's.

A user project joins segplat through Hydra's own search path, the mechanism every Hydra application shares:
`hydra.searchpath=[file://conf]` on the command line of any task (train, sweep, resume, predict, evaluate, the
model summary), and `searchpath=["conf"]` for `segplat.create_model` / `segplat.load_model`. This module turns
those entries into folders; the trust list of checkpoints (`segplat.engine.checkpoint.trusted_targets`) reads the
configs in them, so a model the user's configs name can be rebuilt from a checkpoint, and nothing else.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from segplat.errors import ConfigError

# where a user's configs are documented (named in refusals)
DOC = "docs/user-project.md"
SEARCHPATH_KEY = "hydra.searchpath"


def entry_of(entry: str | Path) -> str:
    """A search-path entry as Hydra writes it: `file://<absolute folder>` for a path, `pkg://...` kept as it is."""
    text = str(entry)
    if text.startswith("pkg://"):
        return text
    folder = Path(text.removeprefix("file://")).expanduser()
    return f"file://{folder.resolve()}"


def folder_of(entry: str | Path, key: str = SEARCHPATH_KEY) -> Path:
    """The folder behind one entry (`file://DIR`, `pkg://package.sub`, or a plain path), or one sentence."""
    text = str(entry)
    if text.startswith("pkg://"):
        name = text.removeprefix("pkg://").strip("/").replace("/", ".")
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ConfigError(f"{key} entry {text}: {name} is not an importable package; install it or add its "
                              "folder to PYTHONPATH.")
        return Path(locations[0])
    folder = Path(text.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key} entry {text} names {folder.resolve()}, which is not a folder; give the folder that "
                          f"holds your model/, dataset/, ... config groups (see {DOC}).")
    return folder.resolve()


def user_config_dirs(searchpath: Sequence[str | Path] = (), key: str = SEARCHPATH_KEY) -> list[Path]:
    """The user's config folders of `searchpath` (segplat's own is never among them)."""
    from segplat.config import CONF_DIR

    folders = [folder_of(e, key) for e in searchpath]
    return [f for i, f in enumerate(folders) if f != CONF_DIR and f not in folders[:i]]


def check_not_shadowed(folders: Sequence[Path]) -> None:
    """A user's config with the group and name of one of segplat's is never read (Hydra finds segplat's first, in
    the package's conf/): refuse it rather than train with the other file."""
    from segplat.config import CONF_DIR

    for folder in folders:
        for shipped in sorted(CONF_DIR.rglob("*.yaml")):
            rel = shipped.relative_to(CONF_DIR)
            if (folder / rel).is_file():
                raise ConfigError(f"{folder / rel} has the name of segplat's own {rel.as_posix()}, which Hydra reads "
                                  f"instead, so yours would never be used; rename it (e.g. "
                                  f"{(rel.parent / ('my_' + rel.name)).as_posix()}).")


def check_command_configs() -> None:
    """Every task, first: the config folders this command was given exist and shadow none of segplat's configs."""
    check_not_shadowed(user_config_dirs(command_searchpath()))


def command_searchpath() -> tuple[str, ...]:
    """The config folders the running Hydra command was given beside segplat's (`hydra.searchpath`,
    `--config-dir`, search-path plugins); empty outside a Hydra application."""
    from hydra.core.hydra_config import HydraConfig

    from segplat.config import CONF_DIR

    if not HydraConfig.initialized():
        return ()
    found = []
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "hydra" or source.schema not in ("file", "pkg"):
            continue  # Hydra's own configs, structured configs
        entry = f"{source.schema}://{source.path}"
        if source.schema == "file" and Path(source.path).expanduser().resolve() == CONF_DIR:
            continue
        found.append(entry)
    return tuple(found)


def searchpath_entries(overrides: Sequence[str]) -> list[str]:
    """The entries of a `hydra.searchpath=[...]` command-line override (none: [])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == SEARCHPATH_KEY]
    if not found:
        return []
    try:
        value = OverridesParser.create().parse_overrides(found[-1:])[0].value()
    except Exception:  # Hydra reports what it cannot parse itself
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def searchpath_override(searchpath: Sequence[str | Path], key: str = "searchpath") -> list[str]:
    """`hydra.searchpath=[...]` for composing with the user's folders (checked to exist); [] for none."""
    if isinstance(searchpath, str | Path):
        searchpath = [searchpath]
    entries = [entry_of(e) for e in searchpath]
    check_not_shadowed(user_config_dirs(entries, key))
    return [f"{SEARCHPATH_KEY}=[{','.join(entries)}]"] if entries else []
