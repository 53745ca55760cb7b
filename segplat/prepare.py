"""`python -m segplat.prepare dataset=NAME dataset.root=DIR`: turn a raw dataset into its zarr patch store.

Runs the same `DataModule.prepare()` that training runs when the store is missing or stale, but on
its own, with a progress bar and a summary (samples and tiles per split, skipped files and why,
notes such as remapped label colours). The store goes where `dataset.store_uri` says (a local folder by
default, or `s3://bucket/prefix/NAME.zarr`). Re-running resumes an unfinished store, or verifies a
complete one with the same fingerprint: `verify=deep` (default) reads every chunk, checks its checksum and
every label value, and records the result so training does not check again on this machine; `verify=quick`
checks the structure and that every written tile has its chunk. A damaged store is an error (exit 2), never
"verified". The last line is `store: PATH` (or the URI).
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from segplat.config import check_values, register_resolvers
from segplat.data.store import COMPLETE_MARKER, PatchStore, is_complete, read_marker, verify_store
from segplat.data.store_location import ObjectAccess, check_access
from segplat.errors import DataError, SegplatError
from segplat.schema import Hint, section
from segplat.utils.console import say
from segplat.utils.searchpath import check_command_configs
from segplat.utils.task import CONF_DIR, with_config_hints

log = logging.getLogger("segplat")
register_resolvers()


@section
class ProgressOnly:
    """`trainer` in prepare: the one trainer key dataset configs read (`progress: ${trainer.progress}`)."""

    progress: bool = True


@section
class PrepareTask:
    """The keys of `python -m segplat.prepare` (conf/prepare.yaml) beside `dataset`, checked first by `prepare`."""

    paths: Mapping[str, Any] = field(default_factory=dict)
    task_name: str = "prepare"
    seed: int = 42
    force: Annotated[bool, Hint("rebuild even when a complete store with the same fingerprint exists")] = False
    verify: Annotated[Literal["deep", "quick"],
                      Hint("deep = every checksum and label value, quick = structure and chunk presence")] = "deep"
    trainer: ProgressOnly = field(default_factory=ProgressOnly)
    dataset: Any = None  # a DataModule config: checked against its signature


def summarise(store: PatchStore) -> dict[str, Any]:
    splits = {}
    order = {"train": 0, "val": 1, "test": 2}
    for split in sorted(store.splits, key=lambda s: (order.get(s, 3), s)):
        meta = store.tiles_meta(split)
        written = [m for m in meta if m is not None]
        splits[split] = {"samples": len({m["source"] for m in written}), "tiles": len(written)}
    return {"splits": splits, "skipped": list(store.meta.get("skipped", [])),
            "notes": list(store.meta.get("notes", [])), "fingerprint": store.meta.get("fingerprint"),
            "tile_size": store.tile_size, "compressor": store.meta.get("compressor")}


def prepare(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """Prepare or verify the store of `cfg.dataset`; returns its path (or URI) and a summary."""
    check_values(cfg, PrepareTask)
    verify = str(cfg.get("verify", "deep"))
    dm = instantiate(cfg.dataset)
    _, location, fingerprint = dm.locate()
    check_access(location)
    if cfg.get("force"):
        log.info("force=true: removing %s", location.uri)
        if location.remote:
            access = ObjectAccess(location, read_only=False)
            access.delete(COMPLETE_MARKER)
            access.delete_all()
        elif location.path.exists():
            shutil.rmtree(location.path)
    was_complete = is_complete(location, fingerprint)
    if read_marker(location) is not None and not was_complete:
        log.info("%s was prepared from another config or data (fingerprint differs); rebuilding it", location.uri)
    out = dm.prepare()
    store = PatchStore(location)
    summary = summarise(store)
    summary["verified"] = verify if was_complete else None
    if was_complete:
        problems = verify_store(store, deep=verify == "deep")
        if verify == "deep" and not location.remote:
            dm.record_verification(location, store.build, problems)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"{location.uri} has a {COMPLETE_MARKER} but is damaged: {problems[0]}{more}; delete it "
                            "or run with force=true.")
    elif not location.remote:
        dm.record_verification(location, store.build, [])  # written just now by this process
    summary["dataset"] = dm.name
    summary["root"] = dm.root
    summary["tiles_per_shard"] = dm.tiles_per_shard
    return str(out), summary


def print_summary(path: Path, summary: dict[str, Any]) -> None:
    if summary["verified"] == "deep":
        say(f"store {path} is complete and matches the config (fingerprint {summary['fingerprint']}): "
            "verified (every chunk present, every checksum and label value checked), nothing to do.")
    elif summary["verified"] == "quick":
        say(f"store {path} is complete and matches the config (fingerprint {summary['fingerprint']}): structure "
            "and chunk presence checked (verify=quick; checksums not read, run verify=deep for that), nothing to do.")
    else:
        say(f"prepared {summary['dataset']} from {summary['root']} (tile {summary['tile_size']} px, "
            f"compressor {summary['compressor']}, fingerprint {summary['fingerprint']})")
    say(f"{'split':<12}{'samples':>9}{'tiles':>9}")
    for split, row in summary["splits"].items():
        say(f"{split:<12}{row['samples']:>9}{row['tiles']:>9}")
    skipped = summary["skipped"]
    say(f"skipped: {len(skipped)}")
    for reason in skipped:
        say(f"  - {reason}")
    if summary["notes"]:
        say("notes:")
        for note in summary["notes"]:
            say(f"  - {note}")


@hydra.main(config_path=str(CONF_DIR), config_name="prepare", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        check_command_configs()  # the user's config folders (hydra.searchpath): there, and none hidden
        path, summary = prepare(cfg)
    except SegplatError as err:
        say(f"error: {err}", err=True)
        sys.exit(2)
    print_summary(path, summary)
    say(f"store: {path}")


main = with_config_hints(hydra_main, "prepare")  # an unknown option or key: Hydra's message + a "did you mean", exit 2

if __name__ == "__main__":
    main()
