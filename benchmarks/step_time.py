"""Training-step time on CPU: eager vs `trainer.compile` vs `trainer.channels_last`, one process, alternated.

    python -m benchmarks.step_time [--models unet,segformer_b2,cmx_b2] [--size 256] [--batch 2] [--rounds 3]

For each model (built from the Hydra config as `segplat.train` builds it, clouds modalities rgb + nir, 4 classes)
three copies with the same weights: eager, channels_last, compiled (inductor) through
`segplat.engine.acceleration.prepare_model`, each stepped by the same full training step (forward, composite
loss, backward, clip, AdamW; fp32 as `trainer=cpu`). After a warm-up (the compile happens there and is reported),
`--rounds` rounds time `--steps` steps of each variant in turn, the order rotating per round, so a change in machine
load hits every variant alike; the figure is the median over rounds. Prints a markdown table with the machine load.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from benchmarks.common import (
    MODELS,
    TINY_MODELS,
    TrainStep,
    bench_clouds_config,
    build_model,
    machine_line,
    markdown_table,
    random_batch,
)
from segplat.engine.acceleration import prepare_inputs, prepare_model

MODALITIES = {"rgb": 3, "nir": 1}
VARIANTS = {"eager": (False, False), "channels_last": (False, True), "compile": (True, False),
            "compile+channels_last": (True, True)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default="eager,channels_last,compile")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny models of the tests (a quick check)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # inductor compiles in this process: its default pool of compile-worker processes starts in the background and,
    # on a 2-core machine, slowed every variant (eager included) several-fold for tens of seconds after a compile
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    presets = TINY_MODELS if args.tiny else MODELS
    variants = args.variants.split(",")
    print(f"# {machine_line()}")
    print(f"# input {args.size}², batch {args.batch}, fp32, {args.rounds} rounds x {args.steps} steps per variant, "
          f"warm-up {args.warmup}")
    rows = []
    for name in args.models.split(","):
        cfg = bench_clouds_config("/tmp/segplat_step_time_stores", presets[name])
        torch.manual_seed(0)
        base = build_model(cfg, MODALITIES, 4).train()
        inputs, label = random_batch(MODALITIES, args.size, args.batch, 4)
        steps, feeds, first = {}, {}, {}
        for v in variants:
            compiled, channels_last = VARIANTS[v]
            model = prepare_model(copy.deepcopy(base), compile=compiled, channels_last=channels_last, device="cpu")
            steps[v] = TrainStep(cfg, model)
            feeds[v] = prepare_inputs(inputs, channels_last)
            t = time.perf_counter()
            steps[v](feeds[v], label)
            first[v] = time.perf_counter() - t
            for _ in range(args.warmup - 1):
                steps[v](feeds[v], label)
            print(f"{name} {v}: first step {first[v]:.1f} s (compile included)", flush=True)
        times: dict[str, list[float]] = {v: [] for v in variants}
        load_start = time.strftime("%H:%M:%S") + f" load {os.getloadavg()[0]:.1f}"
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                t = time.perf_counter()
                for _ in range(args.steps):
                    steps[v](feeds[v], label)
                times[v].append((time.perf_counter() - t) / args.steps)
        load_end = time.strftime("%H:%M:%S") + f" load {os.getloadavg()[0]:.1f}"
        eager = statistics.median(times["eager"]) if "eager" in times else None
        for v in variants:
            med = statistics.median(times[v])
            rows.append([name, v, f"{med:.3f}", f"{min(times[v]):.3f}-{max(times[v]):.3f}",
                         f"{eager / med:.2f}x" if eager else "-", f"{first[v]:.1f}", f"{load_start} -> {load_end}"])
        print(markdown_table(["model", "variant", "s / step (median)", "range", "speed vs eager", "first step s",
                              "timed from -> to"], rows[-len(variants):]), flush=True)
    print()
    print(markdown_table(["model", "variant", "s / step (median)", "range", "speed vs eager", "first step s",
                          "timed from -> to"], rows))
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
