"""One GPU run: training throughput, memory and MFU, preprocessing paths, loader rate vs step rate.

    bash benchmarks/gpu/run.sh [--out DIR]          # on the GPU machine: installs what is missing, then this
    python -m benchmarks.gpu.bench --dry-run --out /tmp/gpu_dry   # the same code on CPU in seconds (a test)

Writes `gpu.json` and `gpu.md` to --out (default benchmarks/results/), after every section, so a run cut short
still leaves what it measured. What it measures, each on the same device, one process:
1. **steps**: img/s, ms/step, peak memory and MFU of a full training step (bf16 autocast forward, composite loss,
   backward, clip, AdamW) for unet, segformer-B2 and cmx-B2 at 512² (clouds recipe: RGB + NIR, 4 classes), batch
   8 and 16, eager / channels_last / compile / compile + channels_last. Models are built from the Hydra config
   exactly as `segplat.train` builds them; the switches are `segplat.engine.acceleration.prepare_model` (what
   `trainer.compile` / `trainer.channels_last` apply). Compiled variants run last, within --budget-s: what does
   not fit is listed as skipped, never dropped silently.
2. **flops**: forward FLOPs per image (`segplat.models.summary.count_macs`: convolutions, linear layers, matrix
   products and attention, 2 FLOPs per multiply-add; the papers' "FLOPs" are the MACs), a training step taken as 3x
   forward, and MFU = img/s x step FLOPs per image / the device's dense bf16 peak (table below; a
   device not in the table gets no MFU and says so).
3. **preprocess**: the clouds-recipe Preprocessor (normalisation + brightness/contrast) on a 16 x (3+1) x 512²
   uint8 batch through NumPy (CPU), CuPy (GPU) and a torch transcription (GPU): ms per batch, and the largest
   difference to NumPy (equal to 1e-6 required).
4. **loader**: patches/s of the full CPU loader (workers, crop, flips/rot90, collate, pinned memory) for the
   clouds/CMX 512² recipe with 1, 2, 4, ... workers, against each step rate: the workers a GPU needs; and a short
   end-to-end loop (loader -> device -> CuPy preprocessing -> step) with the loader-bound watch.
5. **predict**: prediction windows/s at 512² (bf16) of `SlidingWindowPredictor.stream`, segplat's sliding-window path
   (preprocessing on the device, forward, softmax, copy back, blending in a ring of rows) over an in-memory 4096²
   scene, against the bare bf16 forward of the same batches, for unet and cmx-B2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    MODELS,
    RESULTS,
    TINY_MODELS,
    TrainStep,
    bench_clouds_config,
    build_model,
    forward_flops,
    loader_rate,
    machine_line,
    markdown_table,
    random_batch,
)
from segplat.utils.io import atomic_write_json, atomic_write_text

VARIANTS = {  # name -> (compile, channels_last)
    "eager": (False, False),
    "channels_last": (False, True),
    "compile": (True, False),
    "compile+channels_last": (True, True),
}
MODALITIES = {"rgb": 3, "nir": 1}
NUM_CLASSES = 4

# Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOPS, from the vendors' datasheets; first match wins.
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"GH200", 989.4),
    (r"H200 NVL", 835.5),
    (r"H200", 989.4),
    (r"H100 NVL", 835.5),
    (r"H100 PCIe", 756.5),
    (r"H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"B200", 2250.0),
    (r"B100", 1750.0),
    (r"A100", 312.0),
    (r"L40S", 362.05),
    (r"L40\b", 181.05),
    (r"L4\b", 121.0),
    (r"A10\b", 125.0),
    (r"RTX A6000", 154.8),
    (r"RTX 4090", 165.2),
]


def bf16_peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in BF16_PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops
    return None


class Report:
    """The run's results, rewritten (atomically, JSON + markdown) after every section."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**meta, "sections": {}}

    def section(self, name: str, value: Any) -> None:
        self.data["sections"][name] = value
        self.write()

    def write(self) -> None:
        atomic_write_json(self.out / "gpu.json", self.data)
        atomic_write_text(self.out / "gpu.md", render_markdown(self.data))


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(data: dict[str, Any]) -> str:
    s = data["sections"]
    lines = [f"# GPU run: {data['status']}", "", f"Command: `{data['command']}`", "",
             f"- device: {data['device']}", f"- machine: {data['machine']}",
             f"- versions: {data['versions']}", f"- precision: {data['precision']}, input {data['size']}² "
             f"(clouds recipe: rgb 3 + nir 1 bands, {NUM_CLASSES} classes)"]
    if data.get("install"):
        lines.append(f"- install at the start: {data['install']}")
    peak = data.get("bf16_peak_tflops")
    lines.append(f"- dense bf16 peak: {peak} TFLOPS" if peak else f"- MFU omitted: {data.get('mfu_note')}")
    if "flops" in s:
        lines += ["", "## Model FLOPs and MACs per image (segplat.models.summary.count_macs: attention included; "
                  "1 multiply-add = 2 FLOPs; papers print the GMACs as \"GFLOPs\")", "",
                  markdown_table(["model", "parameters (M)", "forward GMACs", "forward GFLOPs",
                                  "training step GFLOPs (3x forward)"],
                                 [[m, fmt(v["params_m"], 2), fmt(v["forward_gflops"] / 2, 2),
                                   fmt(v["forward_gflops"], 2), fmt(v["train_gflops"], 2)]
                                  for m, v in s["flops"].items()])]
    if "steps" in s:
        rows = []
        for r in s["steps"]:
            if r.get("skipped") or r.get("error"):
                rows.append([r["model"], r["batch"], r["variant"], "-", "-", "-", "-", "-",
                             r.get("skipped") or r.get("error")])
                continue
            rows.append([r["model"], r["batch"], r["variant"], fmt(r["img_s"]), fmt(r["ms_step"]),
                         fmt(r["peak_mem_gib"], 2), fmt(r.get("mfu_pct")), fmt(r.get("compile_s")),
                         f"x{r['vs_eager']:.2f} vs eager" if r.get("vs_eager") else ""])
        lines += ["", "## Training step (forward + loss + backward + clip + AdamW)", "",
                  markdown_table(["model", "batch", "variant", "img/s", "ms/step", "peak mem GiB", "MFU %",
                                  "first-step / compile s", "note"], rows)]
    if "preprocess" in s:
        p = s["preprocess"]
        lines += ["", f"## Preprocessing of a {p['shape']} uint8 batch (clouds recipe, train=True)", "",
                  markdown_table(["path", "ms / batch (median)", "first call ms", "max abs diff vs NumPy",
                                  "max diff / max(1, abs(NumPy))", "equal to 1e-6"],
                                 [[k, fmt(v.get("ms"), 2), fmt(v.get("first_ms"), 1),
                                   f"{v['max_abs_diff']:.2e}" if "max_abs_diff" in v else "-",
                                   f"{v['max_scaled_diff']:.2e}" if "max_scaled_diff" in v else "-",
                                   v.get("equal", v.get("note", ""))] for k, v in p["paths"].items()])]
    if "loader" in s:
        ld = s["loader"]
        lines += ["", f"## CPU loader ({ld['recipe']})", "",
                  markdown_table(["workers", "patches/s", "per worker", "start-up s"],
                                 [[r["workers"], fmt(r["patches_per_s"]), fmt(r["per_worker"]), fmt(r["startup_s"], 2)]
                                  for r in ld["rates"]])]
    if "loader_vs_step" in s:
        lines += ["", "## Workers needed to feed the step (best variant per model and batch)", "",
                  markdown_table(["model", "batch", "variant", "step img/s", "workers needed", "how"],
                                 [[r["model"], r["batch"], r["variant"], fmt(r["img_s"]), r["workers_needed"], r["how"]]
                                  for r in s["loader_vs_step"]])]
    if "end_to_end" in s:
        lines += ["", "## End to end: loader -> device -> preprocessing -> step (LoaderWatch)", "",
                  markdown_table(["model", "batch", "workers", "img/s", "data wait % of step", "loader-bound warning"],
                                 [[r["model"], r["batch"], r["workers"], fmt(r["img_s"]), fmt(r["wait_pct"]),
                                   r["warned"]] for r in s["end_to_end"]])]
    if "predict" in s:
        lines += ["", "## Prediction (SlidingWindowPredictor.stream: device preprocessing, forward, softmax, copy "
                  "back, blending; against the bare forward of the same batches)", "",
                  markdown_table(["model", "window", "batch", "scene", "windows", "predict windows/s",
                                  "bare forward windows/s", "predict / forward"],
                                 [[r["model"], r["window"], r["batch"], r["scene"], r["windows"],
                                   fmt(r["predict_windows_s"]), fmt(r["forward_windows_s"]), fmt(r["ratio"], 2)]
                                  for r in s["predict"]])]
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


# -- 1. training steps ----------------------------------------------------------------------------------------
def time_steps(step: TrainStep, inputs: dict[str, torch.Tensor], label: torch.Tensor, device: torch.device,
               warmup: int, steps: int, min_seconds: float) -> tuple[float, float, int | None]:
    """(first step s, seconds per step, peak memory bytes): the first step (compile happens there) and the
    other warm-up steps are not timed; then `steps` steps, more while under `min_seconds`."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    step(inputs, label)
    sync()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        step(inputs, label)
    sync()
    n, t0 = 0, time.perf_counter()
    while n < steps or time.perf_counter() - t0 < min_seconds:
        step(inputs, label)
        n += 1
        if n % 5 == 0:
            sync()
    sync()
    per_step = (time.perf_counter() - t0) / n
    peak = torch.cuda.max_memory_allocated(device) if cuda else None  # not measured on CPU
    return first, per_step, peak


def run_steps(args: argparse.Namespace, device: torch.device, report: Report, started: float,
              flops: dict[str, Any], peak_tflops: float | None, rows: list[dict[str, Any]] | None = None
              ) -> list[dict[str, Any]]:
    """Time every (model, batch, variant) of the plan; appends to `rows` (rewritten to the report after each)."""
    from segplat.engine.acceleration import prepare_inputs, prepare_model

    presets = TINY_MODELS if args.dry_run else MODELS
    rows = rows if rows is not None else []
    stopped = ""
    eager_rate = {(r["model"], r["batch"]): r["img_s"] for r in rows if r["variant"] == "eager" and "img_s" in r}
    compile_cost: dict[str, float] = {}
    plan = [(m, b, v) for v in args.variants if not VARIANTS[v][0] for m in args.models for b in args.batches]
    # compiled variants last: largest batch first (the setting one would train with), then each variant for every
    # model before the next variant, so a budget cut still leaves one compiled figure per model
    plan += [(m, b, v) for b in sorted(args.batches, reverse=True) for v in args.variants if VARIANTS[v][0]
             for m in args.models]
    for model_name, batch, variant in plan:
        compiled, channels_last = VARIANTS[variant]
        row: dict[str, Any] = {"model": model_name, "batch": batch, "variant": variant}
        elapsed = time.perf_counter() - started
        guess = compile_cost.get(model_name, max([args.compile_guess_s, *compile_cost.values()])) if compiled else 10.0
        if stopped:
            row["skipped"] = f"skipped: {stopped}"
            rows.append(row)
            continue
        if elapsed + guess > args.budget_s:
            row["skipped"] = (f"skipped: time budget ({elapsed:.0f} s used of --budget-s {args.budget_s:.0f}; "
                              f"this needs ~{guess:.0f} s)")
            rows.append(row)
            report.section("steps", rows)
            continue
        model = step = inputs = label = None
        try:
            cfg = compose_model_cfg(presets[model_name], args)
            torch.manual_seed(0)
            model = build_model(cfg, MODALITIES, NUM_CLASSES).to(device).train()
            if compiled:
                torch._dynamo.reset()  # a fresh compile per setting: no cache-size fallback to eager
            options = {"backend": args.compile_backend} if compiled else None
            prepare_model(model, compile=compiled, channels_last=channels_last, device=device, compile_options=options)
            step = TrainStep(cfg, model, bf16=args.bf16)
            inputs, label = random_batch(MODALITIES, args.size, batch, NUM_CLASSES, device)
            inputs = prepare_inputs(inputs, channels_last)
            first, per_step, peak = time_steps(step, inputs, label, device, args.warmup, args.steps, args.min_seconds)
        except TimeLimit:
            stopped = "the time limit of run.sh was reached"
            row["error"] = f"stopped: {stopped} during this setting"
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as err:  # one failing setting is reported, the others still run
            if _TERMINATED:
                stopped = "the time limit of run.sh was reached"
                row["error"] = f"stopped: {stopped} during this setting"
            else:
                row["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                traceback.print_exc()
        else:
            row.update(img_s=batch / per_step, ms_step=1000 * per_step,
                       peak_mem_gib=peak / 2**30 if peak is not None else None,
                       compile_s=first - per_step if compiled else first)
            if compiled:
                compile_cost[model_name] = max(compile_cost.get(model_name, 0.0), first + 15 * per_step)
            train_flops = flops.get(model_name, {}).get("train_gflops")
            if peak_tflops and train_flops:
                row["mfu_pct"] = 100 * row["img_s"] * train_flops * 1e9 / (peak_tflops * 1e12)
            if variant == "eager":
                eager_rate[(model_name, batch)] = row["img_s"]
            elif (model_name, batch) in eager_rate:
                row["vs_eager"] = row["img_s"] / eager_rate[(model_name, batch)]
        finally:
            model = step = inputs = label = None  # free the device memory before the next setting
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"steps: {row}", flush=True)
        rows.append(row)
        report.section("steps", rows)
    if _TERMINATED:
        raise TimeLimit()
    return rows


_CONFIGS: dict[tuple[str, ...], Any] = {}


def compose_model_cfg(model_overrides: list[str], args: argparse.Namespace) -> Any:
    key = tuple(model_overrides)
    if key not in _CONFIGS:
        _CONFIGS[key] = bench_clouds_config(args.work, model_overrides)
    return _CONFIGS[key]


class TimeLimit(Exception):
    """SIGTERM from run.sh's `timeout`: stop the setting in progress, keep and write what was measured."""


_TERMINATED = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _TERMINATED
    _TERMINATED = True  # the compile workers get the signal too: their failure then also reads as the limit
    raise TimeLimit()


def count_flops(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    presets = TINY_MODELS if args.dry_run else MODELS
    out = {}
    for name in args.models:
        cfg = compose_model_cfg(presets[name], args)
        torch.manual_seed(0)
        model = build_model(cfg, MODALITIES, NUM_CLASSES).to(device)
        fwd = forward_flops(model, MODALITIES, args.size, NUM_CLASSES, device)
        out[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "forward_gflops": fwd / 1e9,
                     "train_gflops": 3 * fwd / 1e9}
        print(f"flops: {name} {out[name]}", flush=True)
        del model
    return out


# -- 3. preprocessing -----------------------------------------------------------------------------------------
def torch_preprocess(pre: Any, batch: dict[str, torch.Tensor], train: bool, epoch: int, step: int
                     ) -> dict[str, torch.Tensor]:
    """segplat.data.preprocess.Preprocessor transcribed to torch for the ops the clouds recipe uses (no-data
    masking, brightness, contrast), with the same host-drawn parameters: the third path of the comparison."""
    ph = pre.photometric
    if ph is not None and any(float(getattr(ph, k)) > 0 for k in ("gamma", "saturation", "hue", "local_contrast")):
        raise ValueError("the torch transcription covers brightness and contrast only")
    rng = np.random.default_rng([pre.seed, epoch, step, 7])
    out = {}
    for m in pre.modalities:
        x = batch[m].float()
        dev = x.device
        spec = pre.specs[m]
        invalid = torch.isnan(x)
        if spec.nodata is not None and not (isinstance(spec.nodata, float) and math.isnan(spec.nodata)):
            invalid |= x == float(spec.nodata)
        shape = (1, -1, 1, 1)
        if train and ph is not None and spec.optical:
            params = ph.params(rng, x.shape[0])
            lo = torch.as_tensor(pre.lo[m], device=dev).reshape(shape)
            span = torch.as_tensor(pre.span[m], device=dev).reshape(shape)
            u = (x - lo) / span
            w = (~invalid).float()
            mean = (u * w).sum(dim=(2, 3), keepdim=True) / w.sum(dim=(2, 3), keepdim=True).clamp(min=1)
            u = torch.where(invalid, mean, u)
            if float(ph.contrast) > 0:
                u = (u - mean) * torch.as_tensor(params["contrast"], device=dev).reshape(-1, 1, 1, 1) + mean
            if float(ph.brightness) > 0:
                u = u + torch.as_tensor(params["brightness"], device=dev).reshape(-1, 1, 1, 1)
            x = u * span + lo
        mean = torch.as_tensor(pre.mean[m], device=dev).reshape(shape)
        std = torch.as_tensor(pre.std[m], device=dev).reshape(shape)
        out[m] = torch.where(invalid, torch.zeros((), device=dev), (x - mean) / std)
    return out


def time_call(fn, sync, repeats: int) -> tuple[float, float, Any]:
    """(first call ms, median ms of `repeats` more, last result)."""
    t = time.perf_counter()
    result = fn()
    sync()
    first = 1000 * (time.perf_counter() - t)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    return first, float(np.median(times)), result


def bench_preprocess(args: argparse.Namespace, datamodule: Any, device: torch.device) -> dict[str, Any]:
    from segplat.data.preprocess import array_module

    pre = datamodule.preprocessor()
    n = 2 if args.dry_run else 16
    g = torch.Generator().manual_seed(0)
    host = {m: torch.randint(0, 256, (n, c, args.size, args.size), generator=g, dtype=torch.uint8)
            for m, c in MODALITIES.items()}
    shape = f"{n} x {sum(MODALITIES.values())} x {args.size}²"
    reps = 5 if args.dry_run else 20
    paths: dict[str, Any] = {}
    first, ms, ref = time_call(lambda: pre(host, train=True, epoch=1, step=3), lambda: None, reps)
    paths["numpy (CPU)"] = {"ms": ms, "first_ms": first}

    def compare(result: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Equal to 1e-6: |x - ref| <= 1e-6 * max(1, |ref|) everywhere (float32 holds ~7 digits: at |ref| ~ 5
        one unit in the last place is 5e-7, and sums in another order differ by a few of them)."""
        diff = max(float((result[m].float().cpu() - ref[m]).abs().max()) for m in MODALITIES)
        scaled = max(float(((result[m].float().cpu() - ref[m]).abs() / ref[m].abs().clamp(min=1)).max())
                     for m in MODALITIES)
        return {"max_abs_diff": diff, "max_scaled_diff": scaled, "equal": "yes" if scaled <= 1e-6 else "NO"}

    if device.type == "cuda":
        sync = torch.cuda.synchronize
        dev_batch = {m: t.to(device) for m, t in host.items()}
        if array_module(dev_batch["rgb"]) is None:
            paths["cupy (GPU)"] = {"note": "CuPy is not installed: not measured"}
        else:
            first, ms, res = time_call(lambda: pre(dev_batch, train=True, epoch=1, step=3), sync, reps)
            paths["cupy (GPU)"] = {"ms": ms, "first_ms": first, **compare(res)}
        first, ms, res = time_call(lambda: torch_preprocess(pre, dev_batch, True, 1, 3), sync, reps)
        paths["torch (GPU)"] = {"ms": ms, "first_ms": first, **compare(res)}
        pinned = {m: t.pin_memory() for m, t in host.items()}  # as the loader hands batches over (pin_memory)
        first, ms, res = time_call(lambda: pre({m: t.to(device, non_blocking=True) for m, t in pinned.items()},
                                               train=True, epoch=1, step=3), sync, reps)
        paths["host -> GPU copy + cupy"] = {"ms": ms, "first_ms": first, **compare(res)}
    else:
        first, ms, res = time_call(lambda: torch_preprocess(pre, host, True, 1, 3), lambda: None, reps)
        paths["torch (CPU)"] = {"ms": ms, "first_ms": first, **compare(res)}
        paths["cupy (GPU)"] = {"note": "no CUDA device: not measured"}
    print(f"preprocess: {paths}", flush=True)
    return {"shape": shape, "paths": paths}


# -- 5. prediction ---------------------------------------------------------------------------------------------
def bench_predict(args: argparse.Namespace, datamodule: Any, device: torch.device) -> list[dict[str, Any]]:
    """Windows/s of segplat's sliding-window prediction against the bare forward, per model, one device."""
    from segplat.inference import ArraySource, LoadedModel, SlidingWindowPredictor

    presets = TINY_MODELS if args.dry_run else MODELS
    window, batch = args.size, args.predict_batch
    side = window * (2 if args.dry_run else 8)
    rng = np.random.default_rng(0)
    scene = {m: rng.integers(1, 255, (c, side, side), dtype=np.uint8) for m, c in MODALITIES.items()}
    info = datamodule.info
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for name in args.predict_models:
        model = predictor = None
        try:
            cfg = compose_model_cfg(presets[name], args)
            torch.manual_seed(0)
            model = build_model(cfg, MODALITIES, NUM_CLASSES).to(device).eval()
            loaded = LoadedModel(model, datamodule.preprocessor(), dict(info.specs), list(info.classes),
                                 [list(c) for c in info.palette], 255, window, cfg, Path("bench"))
            predictor = SlidingWindowPredictor(loaded, window=window, overlap=0.25, batch_size=batch, device=device,
                                               bf16=args.bf16, progress=False)
            warm = {m: ArraySource(a[:, :2 * window, :2 * window]) for m, a in scene.items()}
            for _ in predictor.stream(warm):  # cudnn autotuning and allocation, not timed
                pass
            windows = predictor.grid(side, side).num_windows
            sync()
            t = time.perf_counter()
            for _ in predictor.stream({m: ArraySource(a) for m, a in scene.items()}):
                pass
            sync()
            predict_s = time.perf_counter() - t
            inputs, _ = random_batch(MODALITIES, window, batch, NUM_CLASSES, device)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
            with torch.no_grad(), autocast:
                model(inputs)
                sync()
                t = time.perf_counter()
                for _ in range(-(-windows // batch)):
                    model(inputs)["out"].float().softmax(1)
                sync()
            forward_s = time.perf_counter() - t
            row = {"model": name, "window": window, "batch": batch, "scene": f"{side}²", "windows": windows,
                   "predict_windows_s": windows / predict_s, "forward_windows_s": windows / forward_s,
                   "ratio": forward_s / predict_s}
        except TimeLimit:
            raise
        except Exception as err:  # one model's failure is reported, the others still run
            row = {"model": name, "window": window, "batch": batch, "scene": f"{side}²", "windows": None,
                   "predict_windows_s": None, "forward_windows_s": None, "ratio": None,
                   "error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
        print(f"predict: {row}", flush=True)
        rows.append(row)
        del model, predictor
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- 4. loader --------------------------------------------------------------------------------------------------
def bench_loader(args: argparse.Namespace, datamodule: Any) -> dict[str, Any]:
    rates = []
    for w in args.workers:
        r = loader_rate(datamodule, w, args.loader_batches)
        print(f"loader: {r}", flush=True)
        rates.append(r)
    recipe = (f"clouds/CMX recipe: patch {datamodule.patch_size}, batch {datamodule.batch_size}, "
              f"augment {datamodule.augment_cfg}, {len(datamodule.train_loader()) * datamodule.batch_size} patches "
              f"per epoch; {args.loader_batches} batches timed after 2")
    return {"recipe": recipe, "rates": rates}


def workers_needed(rates: list[dict[str, Any]], img_s: float) -> tuple[Any, str]:
    for r in sorted(rates, key=lambda r: r["workers"]):
        if r["workers"] > 0 and r["patches_per_s"] >= img_s:
            return r["workers"], f"measured: {r['workers']} worker(s) give {r['patches_per_s']:.0f} patches/s"
    top = max((r for r in rates if r["workers"] > 0), key=lambda r: r["workers"], default=None)
    if top is None:
        return "-", "no worker count measured"
    need = math.ceil(img_s / top["per_worker"])
    return need, (f"extrapolated from {top['per_worker']:.0f} patches/s per worker at {top['workers']} workers "
                  f"(more than measured; assumes linear scaling and as many free cores)")


def loader_vs_step(steps: list[dict[str, Any]], rates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in steps:
        key = (r["model"], r["batch"])
        if "img_s" in r and (key not in best or r["img_s"] > best[key]["img_s"]):
            best[key] = r
    out = []
    for (model, batch), r in best.items():
        need, how = workers_needed(rates, r["img_s"])
        out.append({"model": model, "batch": batch, "variant": r["variant"], "img_s": r["img_s"],
                    "workers_needed": need, "how": how})
    return out


def end_to_end(args: argparse.Namespace, datamodule: Any, device: torch.device, workers: list[int]
               ) -> list[dict[str, Any]]:
    """The training loop's data path for real: loader -> device -> preprocessor -> eager step, with LoaderWatch."""
    from segplat.engine.loader_watch import LoaderWatch

    presets = TINY_MODELS if args.dry_run else MODELS
    model_name = "cmx_b2" if "cmx_b2" in args.models else args.models[0]
    cfg = compose_model_cfg(presets[model_name], args)
    torch.manual_seed(0)
    model = build_model(cfg, MODALITIES, NUM_CLASSES).to(device).train()
    step = TrainStep(cfg, model, bf16=args.bf16)
    pre = datamodule.preprocessor()
    rows = []
    for w in workers:
        datamodule.num_workers = w
        loader = datamodule.train_loader()
        watch = LoaderWatch(device, num_workers=w, min_steps=max(1, min(20, len(loader) - 4)))
        n = 0
        t0 = None
        for i, batch in enumerate(watch.wrap(loader)):
            if i == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            inputs = pre(batch, train=True, epoch=1, step=i)
            step(inputs, batch["label"])
            if i >= 2:
                n += int(batch["label"].shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        img_s = n / (time.perf_counter() - t0) if t0 is not None and n else None
        fraction = watch.wait_fraction
        rows.append({"model": model_name, "batch": datamodule.batch_size, "workers": w, "img_s": img_s,
                     "wait_pct": 100 * fraction if fraction is not None else None, "warned": watch.warned,
                     "steps_counted": watch.steps})
        print(f"end_to_end: {rows[-1]}", flush=True)
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_sections(args: argparse.Namespace, datamodule: Any, device: torch.device, report: Report, started: float,
                 peak: float | None) -> None:
    report.section("preprocess", bench_preprocess(args, datamodule, device))
    report.section("loader", bench_loader(args, datamodule))
    flops = count_flops(args, device)
    report.section("flops", flops)
    rates = report.data["sections"]["loader"]["rates"]
    # eager and channels_last first; the end-to-end check before the compiled settings eat the budget
    args_plain = argparse.Namespace(**{**vars(args), "variants": [v for v in args.variants if not VARIANTS[v][0]]})
    steps = run_steps(args_plain, device, report, started, flops, peak)
    report.section("loader_vs_step", loader_vs_step(steps, rates))
    e2e_workers = sorted({min(args.workers[-1], 2), args.workers[-1]}) if not args.dry_run else [0]
    datamodule.batch_size = 8 if not args.dry_run else 2
    report.section("end_to_end", end_to_end(args, datamodule, device, e2e_workers))
    report.section("predict", bench_predict(args, datamodule, device))
    args_compiled = argparse.Namespace(**{**vars(args), "variants": [v for v in args.variants if VARIANTS[v][0]]})
    if args_compiled.variants:
        run_steps(args_compiled, device, report, started, flops, peak, rows=steps)
        report.section("loader_vs_step", loader_vs_step(steps, rates))


# -- main -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny models and sizes: checks the plumbing")
    ap.add_argument("--out", default=None, help="folder for gpu.json and gpu.md (default benchmarks/results/; a dry "
                    "run: a temporary folder, so it never replaces GPU results)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default=None, help="batch sizes (default 8,16; dry run 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--size", type=int, default=None, help="input side (default 512; dry run 32)")
    ap.add_argument("--workers", default=None, help="loader worker counts (default 1,2,4,8,12 up to the CPUs)")
    ap.add_argument("--budget-s", type=float, default=380.0,
                    help="seconds this script may take; compiled settings that would not fit are skipped")
    ap.add_argument("--compile-guess-s", type=float, default=90.0,
                    help="assumed compile time of a model before one was measured (budget planning)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)")
    ap.add_argument("--predict-models", default="unet,cmx_b2", help="models of the prediction section")
    ap.add_argument("--predict-batch", type=int, default=None, help="windows per batch in prediction (default 8; "
                    "dry run 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="time each setting for at least this long")
    ap.add_argument("--loader-batches", type=int, default=None)
    ap.add_argument("--install-log", default=None, help="a file with run.sh's install summary (one line)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.out = args.out or (str(Path(tempfile.gettempdir()) / "segplat_gpu_dry_run") if dry else str(RESULTS))
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.predict_models = [m for m in args.predict_models.split(",") if m]
    args.predict_batch = args.predict_batch or (2 if dry else 8)
    for key, values, known in (("--models", args.models, MODELS), ("--variants", args.variants, VARIANTS),
                               ("--predict-models", args.predict_models, MODELS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            ap.error(f"{key}: unknown {unknown}; choose from {', '.join(known)}")
    args.batches = [int(b) for b in (args.batches or ("2" if dry else "8,16")).split(",")]
    args.size = args.size or (32 if dry else 512)
    cpus = os.cpu_count() or 1
    args.workers = [int(w) for w in args.workers.split(",")] if args.workers else \
        ([0, 1] if dry else [w for w in (1, 2, 4, 8, 12) if w <= cpus])
    args.loader_batches = args.loader_batches or (4 if dry else 60)
    args.compile_backend = args.compile_backend or ("eager" if dry else "inductor")
    if dry:
        args.warmup, args.steps, args.min_seconds = 1, 1, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA device; run with --dry-run to check the script on CPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda") if cuda else torch.device("cpu")
    args.bf16 = cuda
    torch.backends.cuda.matmul.allow_tf32 = True  # what any bf16 run sets for its fp32 leftovers
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    name = torch.cuda.get_device_name(device) if cuda else "CPU (dry run)"
    peak = bf16_peak_tflops(name) if cuda else None
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = "not installed"
    install = Path(args.install_log).read_text().strip() if args.install_log and Path(args.install_log).is_file() \
        else None
    meta = {
        "status": (f"measured on {name}" if cuda else "dry run on CPU (plumbing check with tiny models; these are "
                   "not GPU figures)"),
        "command": ("bash benchmarks/gpu/run.sh " if cuda else "python -m benchmarks.gpu.bench ") + " ".join(
            a for a in sys.argv[1:] if not a.startswith("--install-log") and a != args.install_log),
        "argv": sys.argv[1:],
        "device": name + (f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
                          if cuda else ""),
        "machine": machine_line(),
        "versions": f"torch {torch.__version__}, CUDA {torch.version.cuda}, cupy {cupy_version}",
        "precision": "bf16 autocast" if cuda else "fp32",
        "size": args.size,
        "bf16_peak_tflops": peak,
        "mfu_note": None if peak else (f"{name} is not in the table of bf16 peaks (benchmarks/gpu/bench.py "
                                       "BF16_PEAK_TFLOPS)" if cuda else "no GPU in a dry run"),
        "install": install,
        "notes": [],
    }
    report = Report(out, meta)
    report.write()
    work = Path(tempfile.mkdtemp(prefix="segplat_gpu_bench_"))
    try:
        return run_all(args, device, report, started, peak, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(args: argparse.Namespace, device: torch.device, report: Report, started: float, peak: float | None,
            work: Path) -> int:
    args.work = work / "stores"
    from hydra.utils import instantiate

    # the clouds recipe's data: enough patches per epoch for the loader timing, one store for everything
    scenes = 8 if args.dry_run else 32
    data_cfg = bench_clouds_config(args.work, [f"dataset.patch_size={args.size}", f"dataset.tile_size={args.size}",
                                               f"dataset.patches_per_tile={16 if not args.dry_run else 4}",
                                               *(["dataset.batch_size=2"] if args.dry_run else [])],
                                   num_train=scenes, scene_size=args.size)
    datamodule = instantiate(data_cfg.dataset)
    t = time.perf_counter()
    datamodule.setup()
    report.data["notes"].append(f"store of {scenes} scenes {args.size}² written in {time.perf_counter() - t:.1f} s")

    try:
        run_sections(args, datamodule, device, report, started, peak)
    except TimeLimit:
        report.data["notes"].append("stopped by run.sh's time limit (SIGTERM) before the end: the sections above "
                                    "are complete, the missing ones were not reached")
    total = time.perf_counter() - started
    report.data["notes"].append(f"this script took {total:.0f} s (budget {args.budget_s:.0f} s)")
    report.data["notes"].append("img/s are from steps on one device with inputs already there (no loader); the "
                                "loader table says how many CPU workers keep each step fed")
    report.write()
    print(json.dumps({"seconds": round(total, 1), "out": str(report.out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
