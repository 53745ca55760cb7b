"""How fast `python -m segplat.train` refuses bad input: the goal is "before any compute", i.e. about the time
the interpreter needs to import torch and compose the config, whatever the dataset or model.

Each case runs as its own process (as a user runs it); the time is wall clock from start to exit, the
status and the last stderr line are checked so that a case that stopped for another reason is reported.
Moved here from a timed assert in tests/test_train.py ("stops in under 60 s").

    python benchmarks/cli_errors.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "missing dataset root": (["model=cmx", "dataset=clouds"], "error: dataset.root is not set"),
    "unknown key (did you mean)": (["trainer.max_epoch=3"], "error: trainer.max_epoch is not a key of trainer"),
    "unknown option": (["model=unett"], "error: model=unett is not an option of model"),
    "re-used run folder": (["run_name=taken"], "error: run folder"),
}


def run_case(args: list[str], expect: str, log_dir: Path) -> float:
    env = {**os.environ, "SEGPLAT_LOG_DIR": str(log_dir), "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "segplat.train", *args], cwd=log_dir, env=env, capture_output=True,
                          text=True, timeout=600)
    seconds = time.perf_counter() - started
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode != 2 or not last.startswith(expect):
        raise SystemExit(f"{args}: exit {proc.returncode}, last line {last!r}; expected exit 2 and {expect!r}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        taken = logs / "train" / "runs" / "taken"
        (taken / "checkpoints").mkdir(parents=True)
        (taken / "metrics.jsonl").write_text('{"epoch": 1}\n')
        load = os.getloadavg()[0]
        rows = []
        for name, (overrides, expect) in CASES.items():
            times = [run_case(overrides, expect, logs) for _ in range(args.repeats)]
            rows.append(f"| {name} | `{' '.join(overrides)}` | {min(times):.1f} | {statistics.median(times):.1f} | "
                        f"{max(times):.1f} |")
    print(f"# {platform.machine()}, python {platform.python_version()}; {os.cpu_count()} CPUs, load average at start "
          f"{load:.1f}; {args.repeats} runs per case, wall seconds from start to exit status 2\n")
    print("| case | overrides | min s | median s | max s |\n|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
