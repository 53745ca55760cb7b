"""`python -m segplat.data.fake NAME OUT`: write a tiny copy of a dataset in its real on-disk format.

Used by the tests and by users who want to try a layout (and its config) before downloading the real
data. One module per layout (`segplat/data/fake/<layout>.py`) holds its writer (`write_fake(out_dir,
seed=...)`), apart from the reader, so that the readers never import the writers; this registry only
maps a dataset name to "module:function" and imports lazily, so adding a dataset is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segplat.errors import ConfigError

WRITERS: dict[str, str] = {
    "clouds": "segplat.data.fake.clouds:write_fake",
    "sen1floods11": "segplat.data.fake.sen1floods11:write_fake",
    "vaihingen": "segplat.data.fake.isprs:write_fake_vaihingen",
    "potsdam": "segplat.data.fake.isprs:write_fake_potsdam",
    "geotiff": "segplat.data.fake.geotiff:write_fake",
    "airquality": "segplat.data.fake.airquality:write_fake",
    "s1s2_series": "segplat.data.fake.s1s2_series:write_fake",
    # not a dataset: one scene to predict, a GeoTIFF per modality of the synthetic dataset
    "scene": "segplat.data.fake.scene:write_fake",
}


def writer(name: str) -> Callable[..., Path]:
    """The fake-data writer of dataset `name` (imported on demand)."""
    if name not in WRITERS:
        raise ConfigError(f"no fake-data writer for dataset {name!r}; choose one of {', '.join(sorted(WRITERS))}.")
    module, _, func = WRITERS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def write_fake(name: str, out_dir: str | Path, **kwargs: Any) -> Path:
    """Write the fake copy of `name` under `out_dir` and return the folder to pass as dataset.root."""
    return Path(writer(name)(Path(out_dir), **kwargs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segplat.data.fake", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"dataset: {', '.join(sorted(WRITERS))}")
    parser.add_argument("out", help="folder to write (created; pass it as dataset.root)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = write_fake(args.name, args.out, seed=args.seed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.name == "scene":
        print("wrote a scene to predict; try: python -m segplat.predict ckpt=<a run folder of segplat.train> "
              f"'input={{rgb: {root}/scene_rgb.tif, nir: {root}/scene_nir.tif}}'")
    else:
        print(f"wrote a fake {args.name} dataset; try: python -m segplat.prepare dataset={args.name} "
              f"dataset.root={root}")
    return 0

