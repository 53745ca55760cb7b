"""PredictionVisualizer: a fixed set of validation samples rendered every N epochs.

Each row shows the inputs (one panel per modality, stretched for display), the label and the
prediction in the dataset palette; the PNG goes to `<run>/visuals/epoch_XXX.png` and to wandb.
The samples are the same every time (evenly spaced validation indices), so the PNGs form a
sequence one can flip through to watch the model learn.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from segplat.engine.callbacks import Callback
from segplat.utils.io import atomic_write

if TYPE_CHECKING:
    from segplat.engine.trainer import Trainer

log = logging.getLogger("segplat")


class PredictionVisualizer(Callback):
    name = "visuals"

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 4) -> None:
        self.every = max(1, int(every_n_epochs))
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
        mods = list(info.modalities)
        cols = len(mods) + 2
        fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n), squeeze=False)
        for r in range(n):
            panels: list[tuple[str, Any]] = [(m, preview_rgb(batch[m][r].numpy(), info.specs[m])) for m in mods]
            label = batch["label"][r].numpy()
            panels.append(("label", colourise(np.where(label == info.ignore_index, 255, label), info.palette, 255)))
            panels.append(("prediction", colourise(pred[r], info.palette)))
            for c, (title, img) in enumerate(panels):
                axes[r, c].imshow(img, interpolation="nearest")
                axes[r, c].set_axis_off()
                if r == 0:
                    axes[r, c].set_title(title, fontsize=9)
        fig.suptitle(f"epoch {trainer.state.epoch}: {trainer.monitor} {metrics.get(trainer.monitor, float('nan')):.4f}")
        fig.tight_layout()
        path = trainer.run_dir / "visuals" / f"epoch_{trainer.state.epoch:03d}.png"
        atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
        plt.close(fig)
        for lg in trainer.loggers:
            if hasattr(lg, "log_images"):
                lg.log_images({"val/predictions": str(path)}, step=trainer.state.global_step)


class RunReport(Callback):
    """At the end of training: `curves.png` (loss and validation metrics per epoch) and
    `confusion_matrix.png` of the last validation, in the run folder."""

    name = "report"

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        from segplat.plots import plot_confusion, plot_curves

        plot_curves(trainer.run_dir / "metrics.jsonl", trainer.run_dir / "curves.png", trainer.monitor)
        last = trainer.state.last_metrics
        if last and last.get("confusion_matrix") is not None:
            plot_confusion(np.asarray(last["confusion_matrix"]), trainer.class_names,
                           trainer.run_dir / "confusion_matrix.png",
                           f"epoch {trainer.state.epoch}: mIoU {last.get('miou', float('nan')):.3f}")
