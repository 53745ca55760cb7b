"""TorchGeo's loader on GeoTIFF scenes: RasterDataset (image) & RasterDataset (mask) + RandomGeoSampler.

    PY_WITH_TORCHGEO benchmarks/torchgeo_loader.py FOLDER [--patch 256] [--batch 8] [--patches 64] [--epochs 3]

Run by store_throughput.py with the python of a separate environment that has torchgeo (it is not a segplat
dependency). Reads `scene*_image.tif` / `scene*_label.tif` as data_throughput.py writes them, one thread, no worker
processes, and prints one JSON line: patches per CPU-second and per wall-second (best epoch), torchgeo's version.
"""

from __future__ import annotations

import argparse
import json
import os
import time

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GDAL_NUM_THREADS"):
    os.environ[var] = "1"
os.environ.setdefault("GDAL_CACHEMAX", "1")  # as data_throughput.py: decoded blocks are not served from memory

import torch  # noqa: E402
import torchgeo  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchgeo.datasets import RasterDataset, stack_samples  # noqa: E402
from torchgeo.samplers import RandomGeoSampler  # noqa: E402


class Image(RasterDataset):
    filename_glob = "scene*_image.tif"
    is_image = True


class Mask(RasterDataset):
    filename_glob = "scene*_label.tif"
    is_image = False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patches", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dataset = Image(paths=args.folder) & Mask(paths=args.folder)
    best = (0.0, 0.0)
    for e in range(args.epochs + 1):  # the first pass warms the page cache and file handles
        sampler = RandomGeoSampler(dataset, size=args.patch, length=args.patches, units=torchgeo.samplers.Units.PIXELS)
        torch.manual_seed(e)
        loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch, num_workers=0, collate_fn=stack_samples)
        c, t = time.process_time(), time.perf_counter()
        n = sum(len(batch["image"]) for batch in loader)
        cpu, wall = time.process_time() - c, time.perf_counter() - t
        if e:
            best = max(best, (n / cpu, n / wall))
    print(json.dumps({"cpu": best[0], "wall": best[1], "version": torchgeo.__version__}))


if __name__ == "__main__":
    main()
