"""Peak memory and time of `segplat.predict` on scenes of growing size: streamed, so memory stays flat.

    python benchmarks/predict_memory.py [--sizes 2000 8000 20000] [--window 512] [--threads 1] \
        [--work /tmp/segplat_predict_bench] [--keep] [--out benchmarks/results/predict_memory.md]

Each scene is a 4-band uint16 GeoTIFF (R, G, B, NIR; tiled 512, uncompressed, UTM, nodata 0 along two
borders) written to disk first, block by block, from synthetic cloud scenes (so writing it needs no more
memory than predicting it). Each prediction runs in a fresh `python -m segplat.predict` process; its peak
resident memory is the child's `ru_maxrss` (os.wait4), its time the scene loop's own seconds (summary.json:
reading, model, blending, writing the tiled COG with overviews, previews) beside the process's wall time.

The model is deliberately tiny, so that a 20,000² scene is affordable on a 2-core CPU: segplat's U-Net preset
on timm's `test_efficientnet` (random weights, two pyramid levels, one decoder block of 8 channels; ~86 k parameters),
saved as a real segplat checkpoint and loaded through `load_for_inference`. Memory does not depend on the
model beyond its weights and one batch of activations, which are the same for every scene size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from segplat.data.layouts.base import ModalitySpec  # noqa: E402
from segplat.data.synthetic import make_scene  # noqa: E402

BLOCK = 1024
BORDER = 100  # nodata rows at the top and columns at the right


def write_scene(path: Path, size: int) -> Path:
    """A size x size 4-band uint16 GeoTIFF, written one 1024-row band at a time from four synthetic tiles."""
    if path.is_file():
        with rasterio.open(path) as src:
            if src.shape == (size, size):
                return path
    tiles = []
    for i in range(4):
        rgb, nir, _ = make_scene(11, i, BLOCK)
        tiles.append(np.concatenate([rgb, nir]).astype(np.uint16) * 15 + 1)
    tmp = path.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", driver="GTiff", height=size, width=size, count=4, dtype="uint16", nodata=0,
                       crs="EPSG:32632", transform=from_origin(600000.0, 5800000.0, 10.0, 10.0), tiled=True,
                       blockxsize=512, blockysize=512) as dst:
        for row in range(0, size, BLOCK):
            h = min(BLOCK, size - row)
            band = np.concatenate([tiles[(row // BLOCK + j) % 4][:, :h] for j in range(-(-size // BLOCK))],
                                  axis=2)[:, :, :size]
            if row < BORDER:
                band[:, :BORDER - row] = 0
            band[:, :, size - BORDER:] = 0
            dst.write(band, window=Window(0, row, size, h))
    tmp.rename(path)
    return path


def tiny_checkpoint(path: Path, window: int) -> Path:
    from tests.inference.checkpoints import write_checkpoint

    specs = {"image": ModalitySpec(("red", "green", "blue", "nir"), nodata=0, dtype="uint16")}
    rgb, nir, _ = make_scene(11, 0, 256)  # balance the untrained head on the benchmark's own content
    calibrate = {"image": np.concatenate([rgb, nir]).astype(np.uint16) * 15 + 1}
    return write_checkpoint(path, specs, patch_size=window, calibrate=calibrate)


def run(ckpt: Path, scene: Path, out: Path, window: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "segplat.predict", f"ckpt={ckpt}", f"input={scene}", f"window={window}",
           "progress=false", "device=cpu", f"hydra.run.dir={out}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"prediction of {scene} failed:\n{output[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "loop_s": summary["seconds"],
            "windows": summary["windows"], "cpu_s": usage.ru_utime + usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 20000])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/segplat_predict_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the scenes and outputs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_checkpoint(args.work / "tiny.ckpt", args.window)
    load_start = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        scene = write_scene(args.work / f"scene_{size}.tif", size)
        written = time.perf_counter() - t0
        out = args.work / f"out_{size}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        result = run(ckpt, scene, out, args.window, args.threads)
        result.update(size=size, mpx=size * size / 1e6, write_s=written,
                      scene_mb=scene.stat().st_size / 2**20,
                      classes_mb=(out / f"{scene.stem}_classes.tif").stat().st_size / 2**20)
        rows.append(result)
        print(f"{size}^2: peak RSS {result['rss_mb']:.0f} MB, loop {result['loop_s']:.1f} s "
              f"({result['loop_s'] / result['mpx']:.2f} s/Mpx), wall {result['wall_s']:.1f} s", flush=True)
        if not args.keep:
            scene.unlink()
            for p in sorted(out.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            out.rmdir()
    base = rows[0]
    lines = [
        f"# {platform.machine()}, python {platform.python_version()}, rasterio {rasterio.__version__} (GDAL "
        f"{rasterio.__gdal_version__}), {os.cpu_count()} CPUs, torch threads {args.threads}, window {args.window}, "
        f"overlap 0.25, batch 4, gdal_cache_mb 64; load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end",
        "",
        "| scene | Mpx | input MiB | windows | peak RSS MB | RSS / smallest | loop s | s per Mpx | wall s | "
        "CPU s | classes COG MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['size']}² | {r['mpx']:.0f} | {r['scene_mb']:.0f} | {r['windows']} | {r['rss_mb']:.0f} | "
                     f"{r['rss_mb'] / base['rss_mb']:.2f} | {r['loop_s']:.1f} | {r['loop_s'] / r['mpx']:.3f} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['classes_mb']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(f"\n### {time.strftime('%Y-%m-%d %H:%M')}\n\n```\n{text}```\n")


if __name__ == "__main__":
    main()
