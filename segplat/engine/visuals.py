"""PredictionVisualizer: a fixed set of validation samples rendered every N epochs.

Each row shows the inputs (one panel per modality, stretched for display), the label and the
prediction in the dataset palette, with a legend of the class colours under the grid; the PNG goes
to `<run>/visuals/epoch_XXX.png` and to every tracker of the run.
The samples are the same every time (evenly spaced validation indices), so the PNGs form a
sequence one can flip through to watch the model learn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import numpy as np
import torch

from segplat.engine.callbacks import Callback
from segplat.schema import Hint, PositiveInt
from segplat.utils.io import atomic_write

if TYPE_CHECKING:
    from segplat.engine.trainer import Trainer

log = logging.getLogger("segplat")
NO_PANELS = Hint("to render no panels, set callbacks.visuals=null")


class PredictionVisualizer(Callback):
    name = "visuals"

    # 0 used to mean every epoch (every_n_epochs) or no panels without a word (num_samples)
    def __init__(self, every_n_epochs: Annotated[PositiveInt, NO_PANELS] = 1,
                 num_samples: Annotated[PositiveInt, NO_PANELS] = 4) -> None:
        self.every = int(every_n_epochs)
        self.num_samples = int(num_samples)

    @torch.no_grad()
    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.state.epoch % self.every or not trainer.accelerator.is_main_process:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from segplat.data.dataset import collate
        from segplat.inference import colourise, preview_rgb

        dataset = trainer.val_loader.dataset
        n = min(self.num_samples, len(dataset))
        if n == 0:
            return
        indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
        batch = collate([dataset[i] for i in indices])
        device = trainer.accelerator.device
        batch_dev = {k: v.to(device) for k, v in batch.items()}
        inputs = trainer.preprocess(batch_dev, train=False)
        inputs.update({k: v for k, v in batch_dev.items() if k.endswith("_time_mask")})
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        with trainer.accelerator.autocast():
            pred = model(inputs)["out"].float().argmax(1).cpu().numpy()
        model.train(was_training)
        info = trainer.datamodule.info
        rows = []
        for r in range(n):
            label = batch["label"][r].numpy()
            rows.append([*((m, preview_rgb(batch[m][r].numpy(), info.specs[m])) for m in info.modalities),
                         ("label", colourise(np.where(label == info.ignore_index, 255, label), info.palette, 255)),
                         ("prediction", colourise(pred[r], info.palette))])
        title = f"epoch {trainer.state.epoch}: {trainer.monitor} {metrics.get(trainer.monitor, float('nan')):.4f}"
        fig = panel_figure(rows, info.classes, info.palette, title)
        path = trainer.run_dir / "visuals" / f"epoch_{trainer.state.epoch:03d}.png"
        atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
        plt.close(fig)
        trainer.track("log_images", {"val/predictions": str(path)}, trainer.state.global_step)


def panel_figure(rows: Sequence[Sequence[tuple[str, np.ndarray]]], classes: Sequence[str],
                 palette: Sequence[Sequence[int]], title: str):
    """A grid of (title, RGB image) panels, one row per sample, with the class legend (name + colour) below."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n, cols = len(rows), max(len(r) for r in rows)
    legend_height = 0.35  # inches under the grid
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n + legend_height), squeeze=False)
    for r, panels in enumerate(rows):
        for c, (name, img) in enumerate(panels):
            axes[r, c].imshow(img, interpolation="nearest")
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    handles = [Patch(facecolor=np.asarray(colour[:3], float) / 255, edgecolor="black", label=name)
               for name, colour in zip(classes, palette)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_height / (2.4 * n + legend_height), 1, 1))
    return fig


class RunReport(Callback):
    """At the end of training: `curves.png` (loss and validation metrics per epoch) and
    `confusion_matrix.png` of the last validation, in the run folder."""

    name = "report"

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        from segplat.plots import plot_confusion, plot_curves

        plots = [trainer.run_dir / "curves.png"]
        plot_curves(trainer.run_dir / "metrics.jsonl", plots[0], trainer.monitor)
        last = trainer.state.last_metrics
        if last and last.get("confusion_matrix") is not None:
            plots.append(trainer.run_dir / "confusion_matrix.png")
            plot_confusion(np.asarray(last["confusion_matrix"]), trainer.class_names, plots[1],
                           f"epoch {trainer.state.epoch}: mIoU {last.get('miou', float('nan')):.3f}")
        trainer.track("log_artifacts", [p for p in plots if p.is_file()])
