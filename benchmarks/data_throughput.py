"""Patches per second per core: random crops from the zarr store vs rasterio windowed reads of tiled GeoTIFFs.

    python benchmarks/data_throughput.py [--scenes 6] [--scene-size 1024] [--tile 512] [--patch 256] \
        [--batch 8] [--batches 30] [--out /tmp/segplat_bench]

Both paths run the full CPU pipeline of a training step's data side in one process with one
thread (torch, zarr, blosc and GDAL limited to 1): choose the same random crop (same generator
per sample), read the 4-band uint16 image and the uint8 label, apply the same GeometricAugment
(flips + rot90), collate into a batch. The GeoTIFFs hold exactly the scenes the store was prepared
from (tiled 256x256, deflate as the datasets ship, and uncompressed), and the crop of sample i is
the same scene window on both sides. Files are read warm from the page cache on both sides (the
first pass is discarded), so the figures compare decode + copy cost, not disk speed.

It also prepares the store with each compressor (none / lz4 / zstd) and reports write time,
size on disk and read throughput, which is how the default compressor was chosen. An uncompressed
store is read by PatchDataset through memory maps of its chunk files (segplat/data/chunk_reader.py);
it is also measured with no open-map cache (every read opens its chunk file, as with far more tiles
than the cache holds) and through zarr's own read path, for comparison.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GDAL_NUM_THREADS", "BLOSC_NTHREADS"):
    os.environ[var] = "1"
# GDAL keeps decoded blocks in memory (default 5% of RAM): these few scenes would be served already
# decoded after the warm-up, which a real dataset (far larger than the cache) never is. 1 MB keeps the
# GeoTIFF path decoding like the store does; `--gdal-cache-mb` shows the cached case.
_cache = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--gdal-cache-mb=")), "1")
os.environ["GDAL_CACHEMAX"] = _cache

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from segplat.data.chunk_reader import ChunkCropReader  # noqa: E402
from segplat.data.dataset import PatchDataset, collate  # noqa: E402
from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef  # noqa: E402
from segplat.data.store import prepare_store  # noqa: E402
from segplat.data.transforms import GeometricAugment  # noqa: E402

torch.set_num_threads(1)
cv2.setNumThreads(1)
zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})
try:
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
except Exception:  # pragma: no cover - numcodecs without blosc
    pass


def make_scene(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A scene that compresses like real imagery: smooth structure plus sensor noise, 12-bit range."""
    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), size / 40)
    field = (field - field.mean()) / (field.std() + 1e-6)
    bands = []
    for b in range(4):
        tex = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 2)
        bands.append(1500 + 400 * field * (1 + 0.2 * b) + 120 * tex + rng.normal(0, 25, (size, size)))
    image = np.clip(np.stack(bands), 0, 4095).astype(np.uint16)
    label = np.digitize(field, [-0.5, 0.3, 1.0]).astype(np.uint8)
    return image, label


class BenchLayout(Layout):
    """The generated scenes as a layout, so the store is written by the real prepare code."""

    name = "bench"
    classes = ("a", "b", "c", "d")
    palette = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255))

    def __init__(self, root: str, scenes: int, size: int) -> None:
        super().__init__(root)
        self.n, self.size = scenes, size

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"image": ModalitySpec(("r", "g", "b", "nir"), nodata=None, dtype="uint16")}

    def fingerprint_params(self) -> dict:
        return {"n": self.n, "size": self.size}

    def scan(self) -> dict[str, list[SampleRef]]:
        return {"train": [SampleRef(str(i)) for i in range(self.n)]}

    def label_shape(self, ref: SampleRef) -> tuple[int, int]:
        return self.size, self.size

    def read(self, ref: SampleRef) -> Sample:
        image, label = make_scene(int(ref.id), self.size)
        return Sample({"image": image}, label, source=f"scene{ref.id}")


def write_geotiffs(out: Path, scenes: int, size: int, compress: str | None) -> list[tuple[Path, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    prof = {"driver": "GTiff", "height": size, "width": size, "crs": "EPSG:32633", "tiled": True,
            "blockxsize": 256, "blockysize": 256, "transform": Affine(10, 0, 500000, 0, -10, 4e6)}
    if compress:
        prof.update(compress=compress, predictor=2)
    for i in range(scenes):
        image, label = make_scene(i, size)
        ip, lp = out / f"scene{i}_image.tif", out / f"scene{i}_label.tif"
        with rasterio.open(ip, "w", count=4, dtype="uint16", **prof) as dst:
            dst.write(image)
        with rasterio.open(lp, "w", count=1, dtype="uint8", **prof) as dst:
            dst.write(label[None])
        files.append((ip, lp))
    return files


class GeoTiffPatches(torch.utils.data.Dataset):
    """The same crops as PatchDataset(train=True), read from the source scenes with windowed reads."""

    def __init__(self, store_ds: PatchDataset, files: list[tuple[Path, Path]], tile_windows: list[list[int]],
                 augment: GeometricAugment) -> None:
        self.ref, self.files, self.windows, self.augment = store_ds, files, tile_windows, augment
        self.handles: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.ref)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        tile, _ = self.ref.index[i]
        rng = np.random.default_rng([self.ref.seed, self.ref.epoch, i])
        span = self.ref.tile_size - self.ref.patch_size
        y, x = int(rng.integers(0, span + 1)), int(rng.integers(0, span + 1))  # as PatchDataset._choose_offset
        meta = self.windows[tile]
        scene = int(meta["source"].removeprefix("scene"))
        wy, wx = meta["window"][0], meta["window"][1]
        if scene not in self.handles:
            self.handles[scene] = tuple(rasterio.open(p) for p in self.files[scene])
        img_src, lab_src = self.handles[scene]
        p = self.ref.patch_size
        win = Window(wx + x, wy + y, p, p)
        sample = {"image": img_src.read(window=win), "label": lab_src.read(1, window=win)}
        if self.augment is not None:
            sample = self.augment(sample, rng)
        sample["label"] = np.ascontiguousarray(sample["label"], dtype=np.uint8)  # as PatchDataset
        return sample


def run(ds, batch: int, batches: int, full: bool = True) -> tuple[float, float]:
    """(patches per CPU-second, patches per wall-second) over `batches` batches after a warm-up pass.

    CPU seconds of the whole process (every thread, zarr's event loop included) are the per-core
    figure; wall time is also reported but is only meaningful on an otherwise idle machine.
    `full=False` times the read alone: crop choice + read + label, no augmentation, no collate."""
    idx = list(np.random.default_rng(0).permutation(len(ds)))
    idx = (idx * (batch * batches // len(idx) + 1))[: batch * batches]
    step = collate if full else list
    for k in range(0, len(idx), batch):  # warm-up: page cache, file handles, zarr metadata
        step([ds[j] for j in idx[k:k + batch]])
    c, t = time.process_time(), time.perf_counter()
    for k in range(0, len(idx), batch):
        step([ds[j] for j in idx[k:k + batch]])
    return len(idx) / (time.process_time() - c), len(idx) / (time.perf_counter() - t)


def best(ds, batch: int, batches: int, repeats: int) -> tuple[float, float, float]:
    """Best of `repeats` for the full pipeline (CPU, wall), then the read alone (CPU)."""
    runs = [run(ds, batch, batches) for _ in range(repeats)]
    augment, ds.augment = ds.augment, None
    try:
        read_only = max(run(ds, batch, batches, full=False)[0] for _ in range(repeats))
    finally:
        ds.augment = augment
    return max(r[0] for r in runs), max(r[1] for r in runs), read_only


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--scene-size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timed passes per configuration")
    ap.add_argument("--out", default="/tmp/segplat_bench")
    ap.add_argument("--gdal-cache-mb", default="1", help="GDAL_CACHEMAX in MB (pass as --gdal-cache-mb=N)")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    augment = GeometricAugment()
    print(f"# {platform.processor() or platform.machine()}, python {sys.version.split()[0]}, zarr {zarr.__version__}, "
          f"rasterio {rasterio.__version__}; {args.scenes} scenes {args.scene_size}^2 x 4 bands uint16 + label, "
          f"store tiles {args.tile}, patch {args.patch}, batch {args.batch}, {args.batches} batches, 1 thread, "
          f"GDAL_CACHEMAX={os.environ['GDAL_CACHEMAX']} MB; {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    rows = []
    store_ds = {}
    for comp in ("none", "lz4", "zstd"):
        layout = BenchLayout(str(out), args.scenes, args.scene_size)
        path = out / f"store_{comp}.zarr"
        t = time.process_time()
        prepare_store(layout, path, args.tile, comp, progress=False)
        write_s = time.process_time() - t
        ds = PatchDataset(str(path), "train", args.patch, train=True, patches_per_tile=4, augment=augment)
        store_ds[comp] = ds
        reader = ds._open()["image"]
        how = "zarr read" if not isinstance(reader, ChunkCropReader) else \
            "chunk memmap" if reader.layout.decompressor is None else "chunk bytes, decompressed"
        rows.append((f"zarr store, {comp} (PatchDataset, {how})", *best(ds, args.batch, args.batches, args.repeats),
                     dir_size(path), write_s))
        if comp == "none":
            # the same store with every map closed after its read (what a dataset of far more tiles than the
            # per-array cache holds costs), and through zarr's own read path (array handles cached)
            cold = PatchDataset(str(path), "train", args.patch, train=True, patches_per_tile=4, augment=augment)
            for reader in (cold._open()["image"], cold._open()["label"]):
                reader.max_open = 0
            rows.append(("zarr store, none (PatchDataset, chunk memmap, no open-map cache)",
                         *best(cold, args.batch, args.batches, args.repeats), dir_size(path), write_s))
            plain = PatchDataset(str(path), "train", args.patch, train=True, patches_per_tile=4, augment=augment,
                                 chunk_memmap=False)
            rows.append(("zarr store, none (PatchDataset, zarr read)", *best(plain, args.batch, args.batches,
                                                                           args.repeats), dir_size(path), write_s))
    ref = store_ds["none"]
    from segplat.data.store import PatchStore

    metas = PatchStore(ref.store_path).tiles_meta("train")
    for comp in ("deflate", None):
        t = time.process_time()
        files = write_geotiffs(out / f"tif_{comp or 'none'}", args.scenes, args.scene_size, comp)
        write_s = time.process_time() - t
        ds = GeoTiffPatches(ref, files, metas, augment)
        rows.append((f"GeoTIFF 256-tiled, {comp or 'none'} (rasterio windows)",
                     *best(ds, args.batch, args.batches, args.repeats), dir_size(out / f"tif_{comp or 'none'}"),
                     write_s))
    t = time.process_time()
    for i in range(args.scenes):
        make_scene(i, args.scene_size)
    gen_s = time.process_time() - t
    print("\n| path | patches / CPU-s (per core) | patches / wall-s | read only: patches / CPU-s | size MiB "
          "| write CPU-s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, cpu, wall, read_only, size, ws in rows:
        print(f"| {name} | {cpu:.0f} | {wall:.0f} | {read_only:.0f} | {size / 2**20:.1f} | {ws:.2f} |")
    print(f"\nwrite CPU-s include generating the scenes ({gen_s:.2f} CPU-s of them); the store's also include "
          "per-band statistics.")
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")
    best_tif = max(r[1] for r in rows if r[0].startswith("GeoTIFF"))
    print()
    best_read = max(r[3] for r in rows if r[0].startswith("GeoTIFF"))
    deflate = next(r for r in rows if "deflate" in r[0])
    for name, cpu, _, read_only, *_ in rows:
        if name.startswith("zarr"):
            print(f"- {name}: {cpu / best_tif:.2f}x the faster GeoTIFF path per core, {cpu / deflate[1]:.2f}x "
                  f"deflate GeoTIFF (full pipeline); read alone {read_only / best_read:.2f}x / "
                  f"{read_only / deflate[3]:.2f}x")


if __name__ == "__main__":
    main()
