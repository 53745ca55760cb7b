"""Patches per second of the full CPU loader, per worker: how many workers a GPU step needs.

    python -m segplat.data.fake clouds /tmp/segplat_fake_clouds      # once (the clouds recipe's data)
    python -m benchmarks.loader_rate [--workers 0,1,2] [--batches 30] [--clouds-root /tmp/segplat_fake_clouds]

Measures `DataModule.train_loader()` as training uses it (ShardSampler, PatchDataset random crops from the zarr
store, the recipe's geometric augmentation, collate; worker processes; pinned memory when CUDA is present), for
- the default recipe (`dataset=synthetic`: 64² patches of 128² tiles, batch 16, flips/rot90), and
- the clouds/CMX 512² recipe (`dataset=clouds`: 512² patches, batch 8, flips/rot90) on the fake clouds data
  (`python -m segplat.data.fake clouds DIR`: small PNGs, padded to 512² tiles in the store, so each patch still
  moves a full 512² crop) and on BenchClouds 512² scenes (the data of the GPU run, benchmarks/common.py).
`dataset.patches_per_tile` is raised (8 / 16) only so one epoch holds the timed batches; a patch costs the same.
The first 2 batches (worker start-up, reported separately) are not timed. Per worker = patches/s / workers
(workers = 0: the main process loads). Prints a markdown table with the machine load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import open_dict

from benchmarks.common import bench_clouds_config, compose_train, loader_rate, machine_line, markdown_table


def datamodules(store_dir: Path, clouds_root: Path | None) -> dict[str, object]:
    out = {}
    cfg = compose_train(["trainer.progress=false", "dataset.patches_per_tile=8"])
    with open_dict(cfg):
        cfg.dataset.store_dir = str(store_dir)
    out["default (synthetic, patch 64, batch 16)"] = instantiate(cfg.dataset)
    if clouds_root is not None:
        cfg = compose_train(["dataset=clouds", f"dataset.root={clouds_root}", "trainer.progress=false",
                             "dataset.patches_per_tile=16"])
        with open_dict(cfg):
            cfg.dataset.store_dir = str(store_dir)
        out["clouds/CMX (fake clouds, patch 512, batch 8)"] = instantiate(cfg.dataset)
    cfg = bench_clouds_config(store_dir, ["dataset.patches_per_tile=16"], num_train=32)
    out["clouds/CMX (BenchClouds 512² scenes, patch 512, batch 8)"] = instantiate(cfg.dataset)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loader_rate", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="best of N passes per setting")
    ap.add_argument("--clouds-root", default=None, help="fake clouds data (python -m segplat.data.fake clouds DIR); "
                    "written to a temporary folder when not given")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="segplat_loader_rate_"))
    try:
        clouds_root = Path(args.clouds_root) if args.clouds_root else tmp / "clouds"
        if not args.clouds_root:
            from segplat.data.fake import write_fake

            write_fake("clouds", clouds_root)
        print(f"# {machine_line()}")
        print(f"# {args.batches} batches timed after 2, best of {args.repeats}")
        rows = []
        for recipe, dm in datamodules(tmp / "stores", clouds_root).items():
            dm.setup()
            for w in (int(x) for x in args.workers.split(",")):
                runs = [loader_rate(dm, w, args.batches) for _ in range(args.repeats)]
                best = max(runs, key=lambda r: r["patches_per_s"])
                load = os.getloadavg()[0]
                rows.append([recipe, w, f"{best['patches_per_s']:.0f}", f"{best['per_worker']:.0f}",
                             f"{min(r['startup_s'] for r in runs):.2f}", f"{load:.1f} ({time.strftime('%H:%M:%S')})"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
        print()
        print(markdown_table(["recipe", "workers", "patches/s", "per worker", "start-up s (2 batches)",
                              "load average (1 min)"], rows))
        print(f"\n# {machine_line()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
