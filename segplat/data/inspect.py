"""`python -m segplat.data.inspect dataset=NAME [dataset.root=DIR] [run_name=NAME] [out=DIR] [split=train] [num=8]`.

Looks at a prepared store the way the model will see it, before any training: per-band
histograms over valid pixels (the store's `valid` mask, so the padding around scenes smaller than a
tile never counts, and no nodata; catches wrong scaling, nodata leaking in, swapped bands), class
frequencies (imbalance, a wrong mask table), a PNG grid of patches per modality with the label
overlaid in the dataset's palette (misregistration, wrong band order), and for temporal streams
the per-band mean over valid pixels along the dates (empty or padded dates, date offsets).

Everything else on the command line is a Hydra override of the train config (`dataset=...`,
`dataset.root=...`, `dataset.tile_size=...`, `run_name=...`); the store is prepared first if it is
missing. The plots go to `logs/inspect/<run_name>/` (`paths.log_dir`, like every task; `out=DIR` to
put them elsewhere).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segplat.config import CONF_DIR
from segplat.errors import ConfigError
from segplat.utils.io import atomic_write_json
from segplat.utils.task import user_error_in

OWN_KEYS = ("out", "split", "num", "seed")


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into this tool's own keys and Hydra overrides."""
    own, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def _whole_number(own: dict[str, str], key: str, default: int, least: int) -> int:
    try:
        value = int(own.get(key, default))
    except ValueError:
        value = least - 1
    if value < least:
        raise ConfigError(f"{key}={own[key]} must be a whole number of at least {least}.")
    return value


def _valid_values(arr: np.ndarray, nodata: float | None, valid: np.ndarray | None = None) -> np.ndarray:
    """The values of `arr` (..., h, w) that are data: inside the store's `valid` mask (h, w), finite, not nodata."""
    a = arr.astype(np.float64)
    ok = np.isfinite(a)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        ok &= a != nodata
    if valid is not None:
        ok &= np.broadcast_to(valid, a.shape)
    return a[ok]


def _valid_on(group: Any, index: int, shape: tuple[int, int]) -> np.ndarray:
    """The tile's valid mask (False on padding and where every modality is nodata) on a modality's grid."""
    from segplat.data.store import _resize_nearest_mask

    return _resize_nearest_mask(np.asarray(group["valid"][index]), shape)


def _display(arr: np.ndarray, stats: dict[str, list[float]], nodata: float | None) -> np.ndarray:
    """(C, h, w) -> (h, w, 3) or (h, w) in [0, 1], stretched per band by the store's p2/p98."""
    bands = [0, 1, 2] if arr.shape[0] >= 3 else [0]
    out = []
    for b in bands:
        lo, hi = stats["p2"][b], stats["p98"][b]
        x = arr[b].astype(np.float64)
        bad = ~np.isfinite(x)
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            bad |= x == nodata
        y = np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        y[bad] = 0
        out.append(y)
    return np.stack(out, -1) if len(out) == 3 else out[0]


def _overlay(label: np.ndarray, palette: np.ndarray, ignore: int) -> np.ndarray:
    rgba = np.zeros((*label.shape, 4))
    ok = label != ignore
    rgba[ok, :3] = palette[np.clip(label[ok], 0, len(palette) - 1)] / 255.0
    rgba[ok, 3] = 0.4
    return rgba


def inspect_store(store_path: str | Path, out: str | Path, split: str = "train", num: int = 8,
                  seed: int = 0) -> dict[str, Any]:
    """Write the plots and `summary.json` for one split of a store into `out`; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")

    from segplat.data.store import PatchStore

    store = PatchStore(store_path)
    group = store.split(split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = [i for i, m in enumerate(store.tiles_meta(split)) if m is not None]
    if not tiles:
        raise ConfigError(f"split={split} of {store.path} holds no tiles; choose one of {store.splits}.")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(tiles, size=min(num, len(tiles)), replace=False).tolist())
    palette = np.array(store.palette, dtype=np.float64)
    freq = _plot_class_frequencies(store, group, split, tiles, palette, out / "class_frequencies.png")
    files = ["class_frequencies.png"]
    summary: dict[str, Any] = {"store": str(store.path), "split": split, "tiles": len(tiles), "patches": pick,
                               "class_pixels": freq, "modalities": {}}
    for name, spec in store.modalities.items():
        data = [np.asarray(group[name][i]) for i in pick]
        masks = [_valid_on(group, i, d.shape[-2:]) for i, d in zip(pick, data)]
        dates = [np.asarray(group[f"{name}_dates"][i]) for i in pick] if spec.temporal else None
        if dates is not None:  # padded dates are not data either
            masks = [m[None] & (d >= 0)[:, None, None] for m, d in zip(masks, dates)]
        mod_summary: dict[str, Any] = {"shape": list(group[name].shape)}
        mod_summary["bands"] = _plot_histograms(name, spec, data, masks, out / f"histograms_{name}.png")
        _plot_patch_grid(name, spec, store, group, pick, data, dates, palette, out / f"patches_{name}.png")
        files += [f"histograms_{name}.png", f"patches_{name}.png"]
        if dates is not None:
            mod_summary["dates_per_tile"] = _plot_series(name, spec, data, masks, dates, out / f"series_{name}.png")
            files.append(f"series_{name}.png")
        summary["modalities"][name] = mod_summary
    summary["files"] = files
    atomic_write_json(out / "summary.json", summary)
    return summary


def _plot_class_frequencies(store: Any, group: Any, split: str, tiles: list[int], palette: np.ndarray,
                            path: Path) -> dict[str, int]:
    """Pixels per class over the whole split's valid pixels (labels are small: one uint8 per pixel; the padding of
    scenes smaller than a tile never counts, as <ignore> or otherwise), plotted as fractions."""
    import matplotlib.pyplot as plt

    classes, ignore = store.classes, store.ignore_index
    counts = np.zeros(256, np.int64)
    for i in tiles:
        label = np.asarray(group["label"][i])
        counts += np.bincount(label[_valid_on(group, i, label.shape)].ravel(), minlength=256)
    freq = {c: int(counts[k]) for k, c in enumerate(classes)}
    freq["<ignore>"] = int(counts[ignore])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(classes) + 2), 3.5))
    total = max(1, sum(v for k, v in freq.items() if k != "<ignore>"))
    ax.bar(range(len(classes)), [freq[c] / total for c in classes], color=palette[:len(classes)] / 255.0,
           edgecolor="black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("pixel fraction (valid)")
    ax.set_title(f"{store.meta['dataset']} {split}: class frequencies")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return freq


def _plot_histograms(name: str, spec: Any, data: list[np.ndarray], masks: list[np.ndarray],
                     path: Path) -> dict[str, dict[str, float | int]]:
    """Per-band histograms over the valid pixels of the picked tiles; returns min/max/mean/count per band."""
    import matplotlib.pyplot as plt

    nb = len(spec.bands)
    cols = min(nb, 4)
    rows = math.ceil(nb / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    band_summary: dict[str, dict[str, float | int]] = {}
    for b, band in enumerate(spec.bands):
        vals = np.concatenate([_valid_values(d[..., b, :, :], spec.nodata, m) for d, m in zip(data, masks)])
        ax = axes[b // cols][b % cols]
        if vals.size:
            ax.hist(vals, bins=64, color="steelblue")
            band_summary[band] = {"min": float(vals.min()), "max": float(vals.max()), "mean": float(vals.mean()),
                                  "valid": int(vals.size)}
        else:
            band_summary[band] = {"valid": 0}
        ax.set_title(band, fontsize=8)
        ax.tick_params(labelsize=6)
    for k in range(nb, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{name}: per-band histograms (valid pixels, {len(data)} tiles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return band_summary


def _plot_patch_grid(name: str, spec: Any, store: Any, group: Any, pick: list[int], data: list[np.ndarray],
                     dates: list[np.ndarray] | None, palette: np.ndarray, path: Path) -> None:
    """The picked tiles (a series at its middle real date) above the same with the label overlaid."""
    import matplotlib.pyplot as plt

    n = len(pick)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for j, (i, frame) in enumerate(zip(pick, data)):
        if dates is not None:
            real = np.nonzero(dates[j] >= 0)[0]
            frame = frame[int(real[len(real) // 2]) if len(real) else 0]
        label = np.asarray(group["label"][i])
        img = _display(frame, store.stats[name], spec.nodata)
        extent = (0, label.shape[1], label.shape[0], 0)  # coarse grids are shown on the label's extent
        axes[0][j].imshow(img, cmap=None if img.ndim == 3 else "gray", extent=extent, interpolation="nearest")
        axes[1][j].imshow(img, cmap=None if img.ndim == 3 else "gray", extent=extent, interpolation="nearest")
        axes[1][j].imshow(_overlay(label, palette, store.ignore_index), extent=extent, interpolation="nearest")
        axes[0][j].set_title(f"tile {i}", fontsize=7)
        for a in (axes[0][j], axes[1][j]):
            a.axis("off")
    fig.suptitle(f"{name} ({', '.join(spec.bands[:3])}) and label", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _plot_series(name: str, spec: Any, data: list[np.ndarray], masks: list[np.ndarray], dates: list[np.ndarray],
                 path: Path) -> list[int]:
    """Band means over valid pixels per date, one line per picked tile; returns the real dates per tile."""
    import matplotlib.pyplot as plt

    nb = min(len(spec.bands), 4)
    fig, axes = plt.subplots(1, nb, figsize=(3.2 * nb, 2.6), squeeze=False)
    lengths = []
    for d, m, when in zip(data, masks, dates):
        real = when >= 0
        lengths.append(int(real.sum()))
        for b in range(nb):
            values = [_valid_values(d[t, b], spec.nodata, m[t]) for t in np.nonzero(real)[0]]
            axes[0][b].plot(when[real], [v.mean() if v.size else np.nan for v in values], marker=".", lw=0.8)
    for b in range(nb):
        axes[0][b].set_title(spec.bands[b], fontsize=8)
        axes[0][b].set_xlabel("day offset", fontsize=7)
        axes[0][b].tick_params(labelsize=6)
    fig.suptitle(f"{name}: band mean over valid pixels per date ({len(data)} tiles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return lengths


def main(argv: Sequence[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from segplat.config import register_resolvers

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    own, overrides = parse_args(args)
    try:
        num, seed = _whole_number(own, "num", 8, 1), _whole_number(own, "seed", 0, 0)
        register_resolvers()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
        except Exception as err:  # Hydra refused an override: the sentence train gives, with the nearest key
            from segplat.utils.task import config_error_hint

            hint = config_error_hint("train", overrides)
            if hint is None:
                raise
            raise ConfigError(hint) from err
        dm = instantiate(cfg.dataset)
        dm.setup()
        out = Path(own.get("out") or Path(cfg.paths.log_dir) / "inspect" / str(cfg.run_name))
        summary = inspect_store(dm.store_path, out, own.get("split", dm.train_split), num, seed)
    except Exception as err:
        user_error = user_error_in(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(summary['files'])} and summary.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
