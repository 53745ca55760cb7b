"""`segplat.predict` against the model's own speed: the same windows through a hand-written loop and a bare forward.

    python -m benchmarks.predict_speed [--size 3072] [--window 256] [--batch 4] [--threads 1] [--models default,tiny]
        [--processes] [--work /tmp/segplat_predict_speed] [--out benchmarks/results/predict_speed.md]

One scene of two files (`rgb.tif`: 3 x uint16, `nir.tif`: 1 x uint16; size² px, tiled 512, deflate, UTM, nodata
borders), predicted in one process, interleaved per model:
1. **segplat.predict**: `run_prediction` of the composed predict config (window, overlap 0.25, batch, class COG with
   overviews, previews, STAC Item), timed from the call to its return (checkpoint load included), with a per-stage
   breakdown from timers wrapped around its parts: read (`read_windows`), preprocess (`Preprocessor.__call__`),
   forward (the model), softmax and copy to NumPy, nodata mask, blend (what is left of the window loop: weights
   summed into the ring of rows), write (`SceneWriter.write`: argmax into the striped GeoTIFF), COG (`finish`: COG
   conversion with overviews, class table, previews, STAC Item), start-up (checkpoint, listing, settings).
2. **hand loop**: the 30 lines anyone would write: `load_for_inference`, rasterio windowed reads of the same
   windows (boundless, filled with nodata), the checkpoint's preprocessor, `model(...)`, softmax, weighted sum into
   whole-scene arrays, argmax, one tiled deflate GeoTIFF (no overviews, previews or metadata).
3. **bare forward**: the model alone on as many batches of the same shape (inputs made once and one warm-up batch,
   outside the timer). The first two include their cold start (checkpoint load, first batch), the third does not.

Models: `default` = `model=unet` as shipped (ResNet-18 U-Net, random weights), `tiny` = the test U-Net (timm's
test_efficientnet, two levels). `--processes`: the many-process path on 2 cores: two copies of the scene predicted by
one process with 2 torch threads against `torchrun --nproc-per-node=2` with 1 thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, RESULTS, machine_line, markdown_table

BLOCK = 512
BORDER = 40


# -- the scene and the checkpoints -----------------------------------------------------------------------------
def write_scene(folder: Path, size: int) -> dict[str, Path]:
    """rgb.tif and nir.tif, size² px, from synthetic cloud tiles repeated; written block row by block row."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from segplat.data.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"rgb": folder / "rgb.tif", "nir": folder / "nir.tif"}
    if all(p.is_file() for p in paths.values()):
        with rasterio.open(paths["rgb"]) as src:
            if src.shape == (size, size):
                return paths
    tiles = [np.concatenate(make_scene(21, i, BLOCK)[:2]).astype(np.uint16) * 15 + 1 for i in range(4)]
    for m, bands in (("rgb", slice(0, 3)), ("nir", slice(3, 4))):
        count = bands.stop - bands.start
        with rasterio.open(paths[m], "w", driver="GTiff", height=size, width=size, count=count, dtype="uint16",
                           nodata=0, crs="EPSG:32632", transform=from_origin(600000.0, 5800000.0, 10.0, 10.0),
                           tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate") as dst:
            for row in range(0, size, BLOCK):
                h = min(BLOCK, size - row)
                band = np.concatenate([tiles[(row // BLOCK + j) % 4][bands, :h] for j in range(-(-size // BLOCK))],
                                      axis=2)[:, :, :size]
                if row < BORDER:
                    band[:, :BORDER - row] = 0
                band[:, :, size - BORDER:] = 0
                dst.write(band, window=Window(0, row, size, h))
    return paths


def checkpoint(path: Path, model: str, window: int) -> Path:
    from segplat.data.layouts.base import ModalitySpec
    from segplat.data.synthetic import make_scene
    from tests.inference.checkpoints import TINY_MODEL, write_checkpoint

    specs = {"rgb": ModalitySpec(("red", "green", "blue"), nodata=0, dtype="uint16"),
             "nir": ModalitySpec(("nir",), nodata=0, dtype="uint16")}
    rgb, nir, _ = make_scene(21, 0, 256)
    calibrate = {"rgb": rgb.astype(np.uint16) * 15 + 1, "nir": nir.astype(np.uint16) * 15 + 1}
    return write_checkpoint(path, specs, model=TINY_MODEL if model == "tiny" else [], patch_size=window,
                            calibrate=calibrate)


# -- timers ---------------------------------------------------------------------------------------------------
class Stages:
    """Seconds per stage, from wrappers put around segplat's methods for one run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, stage: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


@contextmanager
def instrumented(stages: Stages) -> Iterator[None]:
    import segplat.inference as inference
    from segplat.data.preprocess import Preprocessor
    from segplat.predict import task
    from segplat.predict.writer import SceneWriter

    undo = [stages.wrap(inference.SlidingWindowPredictor, "read_windows", "read"),
            stages.wrap(inference.SlidingWindowPredictor, "window_probs", "_window_probs"),
            stages.wrap(inference.SlidingWindowPredictor, "window_valid", "nodata mask"),
            stages.wrap(Preprocessor, "__call__", "preprocess"),
            stages.wrap(inference, "forward_batch", "_forward_batch"),
            stages.wrap(SceneWriter, "write", "write"),
            stages.wrap(SceneWriter, "finish", "COG + previews + Item"),
            stages.wrap(task, "predict_scenes", "_scenes")]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def breakdown(stages: Stages, total: float) -> dict[str, float]:
    s = dict(stages.seconds)
    out = {"read": s.get("read", 0.0), "preprocess": s.get("preprocess", 0.0)}
    out["forward"] = s.get("_forward_batch", 0.0) - out["preprocess"]
    out["softmax + copy"] = s.get("_window_probs", 0.0) - s.get("_forward_batch", 0.0)
    out["nodata mask"] = s.get("nodata mask", 0.0)
    out["write"] = s.get("write", 0.0)
    out["COG + previews + Item"] = s.get("COG + previews + Item", 0.0)
    loop = s.get("_scenes", 0.0)
    out["blend (rest of the window loop)"] = loop - sum(out.values())
    out["start-up (checkpoint, listing, settings, Collection)"] = total - loop
    return out


# -- the three ways ----------------------------------------------------------------------------------------------
def run_segplat(ckpt: Path, paths: dict[str, Path], out: Path, window: int, batch: int) -> tuple[float, Stages, int]:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from benchmarks.common import CONF_DIR
    from segplat.predict.task import run_prediction

    shutil.rmtree(out, ignore_errors=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=[
            f"ckpt={ckpt}", f"input={{rgb: '{paths['rgb']}', nir: '{paths['nir']}'}}", f"window={window}",
            "overlap=0.25", f"batch_size={batch}", "progress=false", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    stages = Stages()
    with instrumented(stages):
        t = time.perf_counter()
        run_prediction(cfg, out)
        total = time.perf_counter() - t
    windows = json.loads((out / "summary.json").read_text())["windows"]
    return total, stages, windows


def run_hand_loop(ckpt: Path, paths: dict[str, Path], out: Path, window: int, batch: int) -> tuple[float, float]:
    """(total seconds, seconds in model(...)) of the loop anyone would write."""
    import rasterio
    from rasterio.windows import Window

    from segplat.data.windows import window_starts
    from segplat.inference import blend_weights, load_for_inference

    t0 = time.perf_counter()
    loaded = load_for_inference(ckpt)
    srcs = {m: rasterio.open(p) for m, p in paths.items()}
    h, w = srcs["rgb"].shape
    stride = round(window * 0.75)
    coords = [(y, x) for y in window_starts(max(h, window), window, stride)
              for x in window_starts(max(w, window), window, stride)]
    k = len(loaded.classes)
    acc, weight = np.zeros((k, h, w), np.float32), np.zeros((h, w), np.float32)
    ramp = blend_weights(window)
    in_model = 0.0
    for i in range(0, len(coords), batch):
        chunk = coords[i:i + batch]
        arrays = {m: np.stack([s.read(window=Window(x, y, window, window), fill_value=0,
                                      boundless=y + window > h or x + window > w) for y, x in chunk])
                  for m, s in srcs.items()}
        with torch.no_grad():
            inputs = loaded.preprocessor({m: torch.from_numpy(a) for m, a in arrays.items()})
            t = time.perf_counter()
            probs = loaded.model(inputs)["out"].softmax(1).numpy()
            in_model += time.perf_counter() - t
        for (y, x), p in zip(chunk, probs):
            ph, pw = min(window, h - y), min(window, w - x)
            acc[:, y:y + ph, x:x + pw] += p[:, :ph, :pw] * ramp[:ph, :pw]
            weight[y:y + ph, x:x + pw] += ramp[:ph, :pw]
    classes = (acc / np.maximum(weight, 1e-8)).argmax(0).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    profile = srcs["rgb"].profile | {"count": 1, "dtype": "uint8", "nodata": 255, "compress": "deflate"}
    with rasterio.open(out / "classes.tif", "w", **profile) as dst:
        dst.write(classes, 1)
    for s in srcs.values():
        s.close()
    return time.perf_counter() - t0, in_model


def run_bare_forward(ckpt: Path, window: int, batch: int, windows: int) -> float:
    from segplat.inference import load_for_inference

    loaded = load_for_inference(ckpt)
    g = torch.Generator().manual_seed(0)
    inputs = {"rgb": torch.randn(batch, 3, window, window, generator=g),
              "nir": torch.randn(batch, 1, window, window, generator=g)}
    with torch.no_grad():
        loaded.model(inputs)  # warm-up, not timed: the figure is the model's steady speed
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(-(-windows // batch)):
            loaded.model(inputs)["out"].softmax(1)
    return time.perf_counter() - t


def processes_scaling(ckpt: Path, paths: dict[str, Path], work: Path, window: int, batch: int) -> list[dict]:
    """Two copies of the scene: one process with 2 torch threads, then torchrun with 2 processes of 1 thread."""
    folder = work / "two_scenes"
    for m, p in paths.items():
        (folder / m).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            target = folder / m / f"scene_{i}.tif"
            if not target.exists():
                os.link(p, target)
    rows = []
    for label, threads, launcher in (("1 process x 2 threads", 2, []),
                                     ("2 processes x 1 thread (torchrun, gloo)", 1,
                                      ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"])):
        out = work / f"scaling_{threads}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, *launcher, "-m", "segplat.predict", f"ckpt={ckpt}", f"input={folder}",
               f"window={window}", f"batch_size={batch}", "progress=false", "device=cpu", f"hydra.run.dir={out}"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"how": label, "wall_s": wall, "loop_s": summary["seconds"],
                     "windows_per_s": summary["windows_per_s"]})
        print(rows[-1], flush=True)
    return rows


# -- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.predict_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="default,tiny")
    ap.add_argument("--processes", action="store_true", help="also the 2-process comparison (takes both cores)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/segplat_predict_speed"))
    ap.add_argument("--out", type=Path, default=RESULTS / "predict_speed.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    start_machine = machine_line()
    paths = write_scene(args.work / "scene", args.size)
    rows, stage_rows, scaling = [], {}, None
    for model in [m for m in args.models.split(",") if m]:
        ckpt = checkpoint(args.work / f"{model}.ckpt", model, args.window)
        torch.set_num_threads(args.threads)  # the launch plumbing of a predict run may change it: same for all three
        total, stages, windows = run_segplat(ckpt, paths, args.work / f"out_{model}", args.window, args.batch)
        torch.set_num_threads(args.threads)
        hand, hand_model = run_hand_loop(ckpt, paths, args.work / f"hand_{model}", args.window, args.batch)
        torch.set_num_threads(args.threads)
        bare = run_bare_forward(ckpt, args.window, args.batch, windows)
        parts = breakdown(stages, total)
        rows.append([model, windows, f"{total:.1f}", f"{hand:.1f}", f"{bare:.1f}", f"{total / hand:.2f}",
                     f"{total / bare:.2f}", f"{hand / bare:.2f}", f"{100 * hand_model / hand:.0f}",
                     f"{windows / total:.1f}"])
        stage_rows[model] = (parts, total)
        print(rows[-1], {k: round(v, 2) for k, v in parts.items()}, flush=True)
        if args.processes and model == "tiny":
            scaling = processes_scaling(ckpt, paths, args.work, args.window, args.batch)
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Command: `python -m benchmarks.predict_speed {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"- scene: rgb.tif + nir.tif, {args.size}² px uint16 (tiled 512, deflate), window {args.window}, "
             f"overlap 0.25, batch {args.batch}, {args.threads} torch thread(s), CPU",
             f"- machine at start: {start_machine}", f"- machine at end: {machine_line()}", "",
             markdown_table(["model", "windows", "segplat.predict s", "hand loop s", "bare forward s",
                             "predict / hand", "predict / bare", "hand / bare", "forward % of hand loop",
                             "predict windows/s"], rows)]
    for model, (parts, total) in stage_rows.items():
        lines += ["", f"segplat.predict stages, {model} model ({total:.1f} s):", "",
                  markdown_table(["stage", "s", "%"], [[k, f"{v:.2f}", f"{100 * v / total:.1f}"]
                                                       for k, v in parts.items()])]
    if scaling:
        lines += ["", "Two copies of the scene, tiny model, separate processes (`python -m segplat.predict`):", "",
                  markdown_table(["how", "wall s", "scene loop s", "windows/s"],
                                 [[r["how"], f"{r['wall_s']:.1f}", f"{r['loop_s']:.1f}", f"{r['windows_per_s']:.1f}"]
                                  for r in scaling])]
    block = "\n".join(lines) + "\n"
    print(block)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n" + block)


if __name__ == "__main__":
    main()
