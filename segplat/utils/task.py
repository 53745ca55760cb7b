"""What every `python -m segplat.<task>` shares: error reporting, the run folder, the last line."""

from __future__ import annotations

import functools
import logging
import re
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segplat.config import CONF_DIR, check_values
from segplat.errors import SegplatError
from segplat.messages import choices, did_you_mean, first_line, redact
from segplat.utils.console import say, traceback_to_log_file, warnings_logged
from segplat.utils.dist import is_main_process
from segplat.utils.searchpath import check_command_configs, searchpath_entries, user_config_dirs

log = logging.getLogger("segplat")

# set once a task function runs: an exit status 1 before that is Hydra refusing the command line
_task_started = threading.Event()


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: Hydra's output dir (the same on every rank, see launch/)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (tests composing configs directly)
        return Path(cfg.paths.output_dir)


def remove_if_no_results(out_dir: Path, task: str, also: Sequence[str] = ()) -> None:
    """A run folder that holds only Hydra's files (config, log; `also`: a task's own bookkeeping) after a failure
    is removed: a refused command leaves nothing behind."""
    if not out_dir.is_dir():
        return
    hydra_only = {".hydra", f"{task}.log", *also}
    if all(p.name in hydra_only for p in out_dir.iterdir()):
        shutil.rmtree(out_dir, ignore_errors=True)


def user_error_in(err: BaseException | None) -> SegplatError | None:
    """The SegplatError behind `err`, following the cause chain (Hydra wraps errors raised in constructors)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, SegplatError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def task_wrapper(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn user errors into one sentence and exit status 2; print `run_dir: PATH` last."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> Any:
        _task_started.set()
        if not is_main_process():
            logging.getLogger().setLevel(logging.WARNING)
        try:
            check_command_configs()  # the user's config folders (hydra.searchpath): there, and none hidden
            with warnings_logged():
                check_values(cfg)  # required keys and true/false keys, for every task before its own checks
                result = fn(cfg)
        except Exception as err:
            user_error = user_error_in(err)
            if user_error is None:
                traceback_to_log_file(err)  # Hydra prints it on the console; the log file keeps it too
                raise
            say(f"error: {user_error}", err=True)
            sys.exit(2)
        if is_main_process():
            say(f"run_dir: {run_dir_of(cfg)}")
        return result

    return wrapped


def choices_line(cfg: DictConfig) -> str:
    """The config a run composed, in one line for its log: the chosen options and the command-line overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed outside Hydra
        return f"seed={cfg.get('seed')}"
    chosen = [f"{group}={option}" for group, option in hydra_cfg.runtime.choices.items()
              if option is not None and not group.startswith("hydra/")]
    overrides = [redact(str(o)) for o in hydra_cfg.overrides.task]
    return " ".join(chosen) + (f"; overrides: {' '.join(overrides)}" if overrides else "")


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    from segplat.utils.io import atomic_write_text

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


# -- the command line: Hydra's message for an unknown option or key, plus a "did you mean" ---------------
def with_config_hints(hydra_main: Callable[[], Any], config_name: str) -> Callable[[], Any]:
    """Wrap a `@hydra.main` function: when Hydra refuses the command line (it prints its message, with the
    options of a group, and exits 1), add one `error: ...` line with the nearest valid option or key and exit 2,
    as every other user error of a task does."""

    @functools.wraps(hydra_main)
    def main() -> Any:
        try:
            return hydra_main()
        except SystemExit as stop:
            if stop.code == 1 and not _task_started.is_set():
                hint = config_error_hint(config_name, sys.argv[1:])
                if hint is not None:
                    print(f"error: {hint}", file=sys.stderr, flush=True)
                    sys.exit(2)
            raise

    return main


# Hydra flags that take a value (the value is not an override)
_VALUE_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package",
                "--experimental-rerun", "-i", "--info", "-c", "--cfg", "-sc", "--shell-completion"}


def overrides_of(argv: Sequence[str]) -> list[str] | None:
    """The overrides of a Hydra command line; None when it names another primary config (nothing to explain)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir") or \
                arg.startswith(("--config-name=", "--config-path=", "--config-dir=")):
            return None
        elif arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose a config of conf/ outside a running Hydra app (the GlobalHydra state is put back after)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def config_error_hint(config_name: str, argv: Sequence[str]) -> str | None:
    """One sentence for the override Hydra refused, with the nearest valid choice; None if composing succeeds."""
    from hydra.errors import MissingConfigException, OverrideParseException

    overrides = overrides_of(argv)
    if overrides is None:
        return None
    try:
        user_config_dirs(searchpath_entries(overrides))  # a user config folder that is not there, named first
    except SegplatError as err:
        return str(err)
    try:
        compose_config(config_name, overrides)
        return None
    except MissingConfigException as err:
        return _unknown_option(err, overrides)
    except OverrideParseException as err:
        return f"an override could not be parsed ({first_line(err)}); see Hydra's message above."
    except Exception as err:
        if "requires --multirun" in str(err):  # a sweep's line composes under --multirun: something else failed
            return None
        appended = re.search(r"Multiple values for (\S+?)\.", str(err))
        if appended is not None and f"+{appended.group(1)}=" in " ".join(overrides):
            group = appended.group(1)
            return (f"{group} already has a place in the config's defaults, so it is chosen without a +: "
                    f"write {group}=NAME, not +{group}=NAME.")
        found = re.search(r"Could not override '([^']+)'", str(err))
        if found is None:
            return f"the command line was refused ({first_line(err)}); see Hydra's message above."
        key = found.group(1)
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
        return _group_chosen_by_key(key, overrides) or _unknown_key(key, config_name, rest)


def _group_chosen_by_key(key: str, overrides: Sequence[str]) -> str | None:
    """`hydra.sweeper.sampler.name=random` where `hydra/sweeper/sampler` is a config group: the group's spelling."""
    group, _, leaf = key.rpartition(".")
    folder = CONF_DIR / group.replace(".", "/")
    if leaf not in ("name", "type", "kind") or not group or not folder.is_dir():
        return None
    options = sorted(f.stem for f in folder.glob("*.yaml"))
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "")
    slash = group.replace(".", "/")
    where = f"{key} is not a key: {group} is a config group"
    if value in options:
        return f"{where}, chosen with {slash}={value}."
    near = did_you_mean(value, options)
    if near:
        return f"{where}, chosen with {slash}=NAME; did you mean {slash}={near}?"
    return f"{where}, chosen with {slash}=NAME; use {choices(options)}."


def _unknown_option(err: Exception, overrides: Sequence[str]) -> str:
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, value = missing.rpartition("/")
    options = [str(o) for o in (getattr(err, "options", None) or [])] or \
        sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml"))
    near = did_you_mean(value, options)
    if not group:
        return f"{missing} is not a config in conf/; see Hydra's message above."
    where = f"{group}={value} is not an option of {group} (conf/{group}/)"
    if near:
        return f"{where}; did you mean {group}={near}?"
    return f"{where}; choose one of {', '.join(options)}." if options else f"{where}."


def _unknown_key(key: str, config_name: str, other_overrides: Sequence[str]) -> str:
    """The nearest existing key at the deepest level of `key` that exists (`trainer.max_epoch` -> `max_epochs`)."""
    from omegaconf import OmegaConf

    try:
        cfg = compose_config(config_name, other_overrides)
    except Exception:
        cfg = compose_config(config_name, [])
    parts = key.split(".")
    node, known = cfg, []
    for part in parts:
        child = node.get(part) if OmegaConf.is_dict(node) and part in node else None
        if child is None or not OmegaConf.is_dict(child):
            break
        node, known = child, [*known, part]
    if len(known) == len(parts):  # the key exists and is a group: a value Hydra could not take
        return f"{key} could not be overridden; see Hydra's message above."
    wrong = parts[len(known)]
    group = "/".join(known)
    if known and (CONF_DIR / group / f"{wrong}.yaml").is_file():  # e.g. logger.mlflow.tracking_uri without mlflow
        top = known[0]
        if len(known) > 1:  # a nested group (loss/terms) is chosen through its parent's presets
            presets = sorted(f.stem for f in (CONF_DIR / top).glob("*.yaml") if wrong in f.stem.split("_"))
            choose = " or ".join(f"{top}={p}" for p in presets) or f"a {top} preset that uses it"
            return f"{key}: {wrong} is not part of this run's {top}; select it with {choose}."
        several = f" or, beside others, {group}=[jsonl,{wrong}]" if group == "logger" else ""
        return f"{key}: {wrong} is an option of {group} that this run does not select; select it with {group}={wrong}" \
            f"{several}."
    if OmegaConf.is_dict(node) and wrong in node:  # it exists but holds a value, not keys (null: nothing chosen)
        value = OmegaConf.to_container(node, resolve=False).get(wrong)
        shown = "null" if value is None else repr(value)
        return (f"{key}: {'.'.join([*known, wrong])} is {shown} here, not a section with keys; set it whole "
                f"(see its config) or add keys on purpose with +{key}=...")
    candidates = [str(k) for k in node] if OmegaConf.is_dict(node) else []
    near = did_you_mean(wrong, candidates)
    parent = ".".join(known) or "the config"
    if near:
        suggestion = ".".join([*known, near, *parts[len(known) + 1:]])
        return f"{key} is not a key of {parent}; did you mean {suggestion}? (add keys on purpose with +{key}=...)"
    return f"{key} is not a key of {parent}; see Hydra's message above (add keys on purpose with +{key}=...)."
