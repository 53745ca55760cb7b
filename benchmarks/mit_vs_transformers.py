"""Our MiT encoder against transformers' SegformerModel: forward + backward time on the same input.

Both models hold the same (random) weights: the transformers model is saved with `save_pretrained`
and loaded into ours through `pretrained=`, and the four stage maps are checked to agree before any
timing, so both sides compute the same function. Runs alternate (ours, reference, ours, ...) so
that a change in machine load hits both alike; the figure is the median of `--iters` timed runs
after `--warmup` untimed ones. Both sides use PyTorch's scaled_dot_product_attention
(transformers' default "sdpa" implementation) and stochastic depth 0.1 in training mode.

    python benchmarks/mit_vs_transformers.py --variants mit_b0 mit_b2 --batch 2 --size 256 --iters 10 \
        --out benchmarks/results/mit_vs_transformers.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from segplat.models.encoders.mit import MIT_SETTINGS, build_mit


def reference_model(name: str) -> torch.nn.Module:
    from transformers import SegformerConfig, SegformerModel

    dims, depths = MIT_SETTINGS[name]
    return SegformerModel(SegformerConfig(hidden_sizes=list(dims), depths=list(depths), drop_path_rate=0.1))


def step_fn(model: torch.nn.Module, x: torch.Tensor, reference: bool, train: bool) -> Callable[[], None]:
    def run() -> None:
        if train:
            feats = model(pixel_values=x, output_hidden_states=True).hidden_states if reference else model(x)
            sum(f.float().mean() for f in feats).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                _ = model(pixel_values=x, output_hidden_states=True).hidden_states if reference else model(x)
        if x.is_cuda:
            torch.cuda.synchronize()

    return run


def time_pair(ours: Callable[[], None], ref: Callable[[], None], iters: int,
              warmup: int) -> tuple[float, float, float, float]:
    """Medians of (wall ours, wall reference, CPU ours, CPU reference) in seconds.

    CPU time (this process, all threads) is the steadier figure on a shared machine: time spent
    waiting for a core while other processes run does not count.
    """
    for _ in range(warmup):
        ours()
        ref()
    wall: dict[int, list[float]] = {0: [], 1: []}
    cpu: dict[int, list[float]] = {0: [], 1: []}
    for i in range(iters):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            fn = ours if side == 0 else ref
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[side].append(time.process_time() - c)
            wall[side].append(time.perf_counter() - w)
    return (statistics.median(wall[0]), statistics.median(wall[1]), statistics.median(cpu[0]),
            statistics.median(cpu[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["mit_b0", "mit_b2"], choices=list(MIT_SETTINGS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rows = []
    for name in args.variants:
        ref = reference_model(name)
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            ours = build_mit(name, pretrained=tmp, drop_path_rate=0.1)
        ours.to(device).eval()
        ref.to(device).eval()
        with torch.no_grad():
            a = ours(x)
            b = ref(pixel_values=x, output_hidden_states=True).hidden_states
        err = max((u - v).abs().max().item() for u, v in zip(a, b))
        assert err < 1e-4, f"{name}: the two models disagree by {err}; the timing would compare different things"
        for mode in ("forward+backward", "forward (no grad)"):
            train = mode.startswith("forward+")
            ours.train(train)
            ref.train(train)
            t_ours, t_ref, c_ours, c_ref = time_pair(step_fn(ours, x, False, train), step_fn(ref, x, True, train),
                                                     args.iters, args.warmup)
            rows.append((name, mode, t_ours * 1e3, t_ref * 1e3, t_ref / t_ours, c_ours * 1e3, c_ref * 1e3,
                         c_ref / c_ours, err))
            print(f"{name:7s} {mode:18s} wall: ours {t_ours * 1e3:8.1f} ms, transformers {t_ref * 1e3:8.1f} ms "
                  f"({t_ref / t_ours:4.2f}x) | CPU: ours {c_ours * 1e3:8.1f} ms, transformers {c_ref * 1e3:8.1f} ms "
                  f"({c_ref / c_ours:4.2f}x)", flush=True)
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M')} — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}, device {device}",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, input {args.batch}x3x{args.size}x"
        f"{args.size}, median of {args.iters} runs after {args.warmup} warm-up, load average at the end {load:.1f}",
        "",
        "| variant | pass | wall ours (ms) | wall transformers (ms) | transformers / ours | CPU ours (ms) "
        "| CPU transformers (ms) | transformers / ours | max feature diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {m} | {a:.1f} | {b:.1f} | {r:.2f} | {ca:.1f} | {cb:.1f} | {cr:.2f} | {e:.1e} |"
          for n, m, a, b, r, ca, cb, cr, e in rows],
        "",
    ]
    print("\n".join(lines))
    if args.out:
        with args.out.open("a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
