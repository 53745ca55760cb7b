"""MS2MNet forward + backward with its VFE blocks against the same model without them.

"Without VFE" is the same two-stream ResNet-50 + WASE + HFPDecoder (+ DFE, ASAF) with the four VFE blocks
replaced by a module that returns zeros, so f + 0.5 * VFE(f) = f: the cost of the VFEs (state-space mixer,
convs, FFN, SE) is the difference. Training mode, loss = sum of the output means (main and aux heads),
gradients cleared after each step. Runs alternate between the two models so that a change in machine load
hits both alike; figures are medians. Goal (issue 13): with VFE within 2x of without.

    python benchmarks/ms2mnet_vfe.py --batch 2 --size 256 --iters 5 --warmup 1 \
        --out benchmarks/results/ms2mnet_vfe.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.mit_vs_transformers import time_pair
from segplat.models.ms2mnet import MS2MNet


class NoVFE(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(x), None


def build(vfe: bool, mlp_ratio: float, device: torch.device) -> MS2MNet:
    torch.manual_seed(0)
    model = MS2MNet({"irrg": 3, "dsm": 1}, 6, vfe_mlp_ratio=mlp_ratio)
    if not vfe:
        for i in range(1, 5):
            setattr(model, f"vfeBlock{i}", NoVFE())
    return model.to(device).train()


def step(model: MS2MNet, inputs: dict[str, torch.Tensor]):
    def run() -> None:
        out = model(inputs)
        sum(v.float().mean() for v in out.values()).backward()
        model.zero_grad(set_to_none=True)
        if inputs["irrg"].is_cuda:
            torch.cuda.synchronize()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--mlp-ratio", type=float, default=4.0, help="VFE FFN ratio (the preset's 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    inputs = {"irrg": torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device),
              "dsm": torch.randn(args.batch, 1, args.size, args.size, generator=g).to(device)}
    with_vfe, without = build(True, args.mlp_ratio, device), build(False, args.mlp_ratio, device)
    params = [sum(p.numel() for p in m.parameters()) for m in (with_vfe, without)]
    wall_vfe, wall_base, cpu_vfe, cpu_base = time_pair(step(with_vfe, inputs), step(without, inputs), args.iters,
                                                       args.warmup)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"### {stamp} — {platform.machine()}, {os.cpu_count()} CPUs visible, torch threads "
        f"{torch.get_num_threads()}, device {device}",
        "",
        f"torch {torch.__version__}, input {args.batch}x(3+1)x{args.size}x{args.size}, VFE FFN ratio "
        f"{args.mlp_ratio:g}, median of {args.iters} runs after {args.warmup} warm-up, load average at the end "
        f"{load:.1f}",
        "",
        "| model | parameters | wall fwd+bwd (ms) | CPU fwd+bwd (ms) |",
        "|---|---:|---:|---:|",
        f"| MS2MNet | {params[0]:,} | {wall_vfe * 1e3:.0f} | {cpu_vfe * 1e3:.0f} |",
        f"| without VFE | {params[1]:,} | {wall_base * 1e3:.0f} | {cpu_base * 1e3:.0f} |",
        f"| ratio | | **{wall_vfe / wall_base:.2f}** | **{cpu_vfe / cpu_base:.2f}** |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
