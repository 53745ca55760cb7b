"""`python -m segplat.prepare dataset=NAME dataset.root=DIR`: turn a raw dataset into its zarr patch store.

Runs the same `DataModule.prepare()` that training runs when the store is missing or stale, but on
its own, with a progress bar and a summary (samples and tiles per split, skipped files and why,
notes such as remapped label colours). Re-running resumes an unfinished store, or verifies a
complete one with the same fingerprint and exits 0. The last line is `store: PATH`.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from segplat.config import register_resolvers
from segplat.data.store import COMPLETE_MARKER, PatchStore, is_complete, read_marker
from segplat.errors import DataError, SegplatError
from segplat.utils.task import CONF_DIR, with_config_hints

log = logging.getLogger("segplat")
register_resolvers()


def verify_store(store: PatchStore) -> list[str]:
    """Problems with a store that claims to be complete (empty list = fine): unwritten samples, ragged arrays."""
    problems = []
    for split in store.splits:
        group = store.split(split)
        n = group["label"].shape[0]
        for name in [*store.modalities, "valid"]:
            if name not in group or group[name].shape[0] != n:
                problems.append(f"{split}/{name} is missing or does not have {n} tiles")
        done = np.asarray(group["done"][:])
        if not done.all():
            problems.append(f"{split}: {int((~done).sum())} samples were never written")
        if len(store.tiles_meta(split)) != n:
            problems.append(f"{split}: the tile table does not match the {n} tiles")
    return problems


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


def prepare(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Prepare or verify the store of `cfg.dataset`; returns its path and a summary."""
    dm = instantiate(cfg.dataset)
    dm.check_root()
    layout = dm.build_layout()
    path = dm.resolve_store_path(layout)
    fingerprint = layout.fingerprint({"tile_size": dm.tile_size, "format": 1})
    if cfg.get("force") and path.exists():
        log.info("force=true: removing %s", path)
        shutil.rmtree(path)
    was_complete = is_complete(path, fingerprint)
    if path.exists() and read_marker(path) is not None and not was_complete:
        log.info("%s was prepared from another config or data (fingerprint differs); rebuilding it", path)
    out = dm.prepare()
    store = PatchStore(out)
    summary = summarise(store)
    summary["verified"] = was_complete
    if was_complete:
        problems = verify_store(store)
        if problems:
            raise DataError(f"{out} has a {COMPLETE_MARKER} but {problems[0]}; delete it or run with force=true.")
    summary["dataset"] = dm.name
    summary["root"] = dm.root
    return out, summary


def print_summary(path: Path, summary: dict[str, Any]) -> None:
    if summary["verified"]:
        print(f"store {path} is complete and matches the config (fingerprint {summary['fingerprint']}): "
              "verified, nothing to do.")
    else:
        print(f"prepared {summary['dataset']} from {summary['root']} (tile {summary['tile_size']} px, "
              f"compressor {summary['compressor']}, fingerprint {summary['fingerprint']})")
    print(f"{'split':<12}{'samples':>9}{'tiles':>9}")
    for split, row in summary["splits"].items():
        print(f"{split:<12}{row['samples']:>9}{row['tiles']:>9}")
    skipped = summary["skipped"]
    print(f"skipped: {len(skipped)}")
    for reason in skipped:
        print(f"  - {reason}")
    if summary["notes"]:
        print("notes:")
        for note in summary["notes"]:
            print(f"  - {note}")


@hydra.main(config_path=str(CONF_DIR), config_name="prepare", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        path, summary = prepare(cfg)
    except SegplatError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print_summary(path, summary)
    print(f"store: {path}", flush=True)


main = with_config_hints(hydra_main, "prepare")  # an unknown option or key: Hydra's message + a "did you mean", exit 2

if __name__ == "__main__":
    main()
