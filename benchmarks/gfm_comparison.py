"""The CNN vs geo-foundation-model comparison table and plot from the run folders of a sweep (or any runs).

    python -m segplat.train --multirun sweep=sen1floods11_gfm dataset.root=DIR
    python benchmarks/gfm_comparison.py logs/train/sweeps/sen1floods11_gfm [more run folders ...] [--out DIR]

Every folder given (or found below it) that holds a run's `config.yaml` becomes one row: the model (decoder /
encoder and its size), the input modalities, then at the run's best epoch (`summary.json`'s best_epoch, the epoch
the monitored metric chose) the IoU of each class with the water class first, the mIoU; the parameter count;
the mean seconds of a training epoch and of a validation pass (metrics.jsonl). A run with no summary.json (a
failed or running trial) is listed with its status and no metrics. Writes comparison.md, comparison.csv and
comparison.png (per-class IoU bars, one group per input) into --out (default: the first folder), atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from segplat.utils.io import atomic_write, atomic_write_text  # noqa: E402

DECODERS = {"UNetDecoder": "U-Net", "DeepLabV3PlusDecoder": "DeepLabV3+"}
ENCODERS = {"PrithviEncoder": "Prithvi", "TerraMindEncoder": "TerraMind", "TimmEncoder": ""}
# the order rows and bars appear in: CNNs first, then the GFMs; S2, S1, both
MODEL_ORDER = ("U-Net", "DeepLabV3+", "Prithvi", "TerraMind")


def _short(target: str | None) -> str:
    return str(target or "").rsplit(".", 1)[-1]


def model_label(model_cfg: dict[str, Any]) -> str:
    """'U-Net resnet18', 'DeepLabV3+ resnet50', 'Prithvi prithvi_eo_v2_300', ... from a run's model config."""
    encoder = model_cfg.get("encoder") or {}
    decoder = DECODERS.get(_short((model_cfg.get("decoder") or {}).get("_target_")), "")
    family = ENCODERS.get(_short(encoder.get("_target_")), _short(encoder.get("_target_")))
    name = encoder.get("name") or model_cfg.get("backbone") or ""
    if family:  # a GFM: the family names the model, the decoder follows
        return f"{family} {name}".strip() + (f" + {decoder}" if decoder and decoder != "U-Net" else "")
    return f"{decoder or _short(model_cfg.get('_target_'))} {name}".strip()


def find_runs(paths: Sequence[Path]) -> list[Path]:
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise SystemExit(f"error: {path} is not a folder; give a sweep folder or run folders.")
        found = [path] if (path / "config.yaml").is_file() else sorted(p.parent for p in path.rglob("config.yaml")
                                                                       if ".hydra" not in p.parts)
        runs += [r for r in found if r not in runs]
    if not runs:
        raise SystemExit(f"error: no run folder (with config.yaml) under {', '.join(map(str, paths))}.")
    return runs


def read_run(run: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    row: dict[str, Any] = {"run": str(run), "model": model_label(cfg.get("model") or {}),
                           "inputs": "+".join(cfg.get("dataset", {}).get("modalities") or []) or "?",
                           "monitor": (cfg.get("callbacks") or {}).get("monitor")}
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        row["status"] = "no summary.json (failed or running)"
        return row
    summary = json.loads(summary_path.read_text())
    row["status"] = summary.get("status")
    row["params"] = summary.get("num_parameters")
    row["classes"] = list(summary.get("classes") or [])
    records = []
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    best = summary.get("best_epoch")
    at_best = next((r for r in records if r.get("epoch") == best), records[-1] if records else {})
    row["epoch"] = at_best.get("epoch")
    row["miou"] = at_best.get("val/miou", summary.get("miou"))
    row["iou"] = {c: at_best.get(f"val/iou_{c}") for c in row["classes"]}
    train_s = [r["train/seconds"] for r in records if "train/seconds" in r]
    val_s = [r["val/seconds"] for r in records if "val/seconds" in r]
    row["train_s_per_epoch"] = sum(train_s) / len(train_s) if train_s else None
    row["val_s"] = sum(val_s) / len(val_s) if val_s else None
    row["epochs"] = len(records)
    return row


def class_order(rows: list[dict[str, Any]]) -> list[str]:
    classes: list[str] = []
    for row in rows:
        classes += [c for c in row.get("classes", []) if c not in classes]
    return sorted(classes, key=lambda c: (c != "water", classes.index(c)))


def sort_key(row: dict[str, Any]) -> tuple:
    family = next((i for i, m in enumerate(MODEL_ORDER) if row["model"].startswith(m)), len(MODEL_ORDER))
    inputs = {"s2": 0, "s1": 1}.get(row["inputs"], 2)
    return family, row["model"], inputs, row["inputs"]


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]], classes: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "inputs", *[f"IoU {c}" for c in classes], "mIoU", "params (M)", "train s/epoch",
              "val s", "best epoch / epochs", "status"]
    body = []
    for r in rows:
        iou = r.get("iou") or {}
        params = r.get("params")
        body.append([r["model"], r["inputs"], *[fmt(iou.get(c)) for c in classes], fmt(r.get("miou")),
                     fmt(params / 1e6, 2) if params else "-", fmt(r.get("train_s_per_epoch"), 1),
                     fmt(r.get("val_s"), 1), f"{fmt(r.get('epoch'))} / {fmt(r.get('epochs'))}",
                     str(r.get("status"))])
    return header, body


def markdown(header: list[str], body: list[list[str]], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in rows if r.get("iou")]
    inputs = list(dict.fromkeys(r["inputs"] for r in done))
    models = list(dict.fromkeys(r["model"] for r in done))
    metrics = [*[f"IoU {c}" for c in classes], "mIoU"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False, sharey=True)
    width = 0.8 / max(len(models), 1)
    for ax, metric in zip(axes[0], metrics):
        for i, model in enumerate(models):
            values = []
            for inp in inputs:
                r = next((x for x in done if x["model"] == model and x["inputs"] == inp), None)
                v = None if r is None else (r.get("miou") if metric == "mIoU" else r["iou"].get(metric[4:]))
                values.append(np.nan if v is None else v)
            ax.bar(np.arange(len(inputs)) + (i - (len(models) - 1) / 2) * width, values, width, label=model)
        ax.set_xticks(np.arange(len(inputs)), inputs)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("at the best epoch")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep folder and/or run folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first folder)")
    parser.add_argument("--title", default="Sen1Floods11: CNNs vs geo-foundation models")
    args = parser.parse_args(argv)
    rows = sorted((read_run(r) for r in find_runs(args.paths)), key=sort_key)
    classes = class_order(rows)
    header, body = table(rows, classes)
    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(header, body, args.title)
    atomic_write_text(out / "comparison.md", text)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*header, "run"])
    writer.writerows([*row, r["run"]] for row, r in zip(body, rows))
    atomic_write_text(out / "comparison.csv", buf.getvalue())
    if any(r.get("iou") for r in rows):
        plot(rows, classes, out / "comparison.png", args.title)
    print(text, end="")
    print(f"wrote {out / 'comparison.md'}, comparison.csv" + (", comparison.png" if any(r.get("iou") for r in rows)
                                                               else " (no finished run to plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
