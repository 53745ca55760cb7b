"""TensorBoard event files in the run folder (or a shared log_dir, one subfolder per run).

HParams: each run writes a session (its `RunInfo.hparams`: the keys its command line set, for a sweep trial
its draw) and, at its end, its status and the best value of the monitored metric (`best/<monitor>`); the
sweeper writes the experiment (the searched keys with their domains, the monitored metric) in the folder
that holds the trials' sessions (`write_hparams_experiment`), so the HParams tab of a sweep folder compares
its trials on exactly the searched keys. Without an experiment (plain runs side by side), TensorBoard builds
one from the sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from segplat.engine.loggers.base import (
    RunInfo,
    Tracker,
    numeric,
    require,
)
from segplat.errors import CheckpointError
from segplat.utils.io import dumps_json

log = logging.getLogger("segplat")


class TensorBoardLogger(Tracker):
    """TensorBoard event files in `<run>/tensorboard` (or `log_dir/<run name>`): scalars, images, config as hparams +
    text."""

    name = "tensorboard"

    def __init__(self, log_dir: str | None = None, log_images: bool = True) -> None:
        require("tensorboard", "tensorboard")
        self.log_dir = log_dir
        self.images = bool(log_images)
        self.writer = None
        self.step = 0
        self.monitor = "val/miou"

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a shared log_dir gets one subfolder per run (TensorBoard's layout for comparing runs): written straight
        # into it, a new run purged the events of every earlier one
        own = Path(self.log_dir) / run.name if self.log_dir else run.run_dir / "tensorboard"
        if run.resuming:
            check_kept_folder((run.resume_state or {}).get("log_dir"), own, run.run_dir)
        folder = own  # from the config; a checkpoint never chooses where files are written
        self.log_dir = str(folder)
        self.step = run.resume_step
        self.monitor = run.monitor
        if run.resuming:
            purge: int | None = run.resume_step + 1  # steps after the checkpoint are trained (and logged) again
        else:  # a fresh start in a folder with events of an earlier attempt hides those
            purge = 0 if folder.is_dir() and any(folder.glob("events.out.tfevents.*")) else None
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge)
        if not run.resuming:
            self._write_config(run)

    def _write_config(self, run: RunInfo) -> None:
        from tensorboard.plugins.hparams import plugin_data_pb2

        # the session: written once, at step 0 (a resume's purge keeps it)
        start = plugin_data_pb2.SessionStartInfo(group_name=str(run.sweep.get("study_name", "")),
                                                 start_time_secs=time.time())
        for name, value in run.hparams.items():
            start.hparams[name].CopyFrom(_value(value))
        self.writer.file_writer.add_summary(_hparams_summary(start=start))
        self.writer.add_text("config", "```\n" + dumps_json(run.config, default=str, indent=2) + "\n```", 0)
        if run.tags:
            self.writer.add_text("tags", ", ".join(run.tags), 0)
        if run.sweep:
            self.writer.add_text("sweep", ", ".join(f"{k}: {v}" for k, v in run.sweep.items()), 0)
        self.writer.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir} if self.writer is not None else {}

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        if self.writer is not None:
            self.step = step
            for key, value in numeric(record).items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.images:
            self._add_images(images, step)

    def _add_images(self, images: Mapping[str, str | Path], step: int) -> None:
        if self.writer is not None:
            for tag, path in images.items():
                self.writer.add_image(tag, read_rgb(path), step, dataformats="HWC")
            self.writer.flush()

    def log_artifacts(self, files: Sequence[str | Path]) -> None:
        """The end-of-run plots, whatever `log_images` says (it is about the prediction panels, as in MLflow)."""
        self._add_images({f"plots/{Path(f).stem}": f for f in files}, self.step)

    def log_summary(self, facts: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add_text("summary", "\n\n".join(f"{k}: {v}" for k, v in facts.items()), self.step)
            best = facts.get("best_score")
            if isinstance(best, int | float) and not isinstance(best, bool):  # the HParams tab's metric
                self.writer.add_scalar(f"best/{self.monitor}", float(best), self.step)
            self.writer.flush()

    def finish(self, status: str = "completed") -> None:
        if self.writer is not None:
            from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

            # TensorBoard knows success and failure only: a pruned trial ended as the sweep wanted, a killed run did not
            ends = {"completed": api_pb2.STATUS_SUCCESS, "stopped_early": api_pb2.STATUS_SUCCESS,
                    "pruned": api_pb2.STATUS_SUCCESS}
            end = plugin_data_pb2.SessionEndInfo(status=ends.get(status, api_pb2.STATUS_FAILURE),
                                                 end_time_secs=time.time())
            self.writer.file_writer.add_summary(_hparams_summary(end=end), self.step)
            self.writer.close()
            self.writer = None


def check_kept_folder(kept: Any, own: Path, run_dir: Path) -> None:
    """The folder a resumed run's checkpoint kept for its events must be the one the config gives now: the run
    folder's `tensorboard/` (also when the run folder was moved) or `log_dir/<run name>`. Anything else, such as a
    crafted or copied `last.ckpt` naming another folder, is refused rather than followed or silently replaced."""
    if kept is None:
        return
    path = Path(kept) if isinstance(kept, str) and kept else None
    same = path is not None and (path.resolve() == own.resolve() or  # or its tensorboard/ before the folder moved
                                 (own == run_dir / "tensorboard" and path.parts[-2:] == (run_dir.name, "tensorboard")))
    if not same:
        raise CheckpointError(f"trainer.resume: the run's checkpoint keeps {kept!r} as its TensorBoard folder, but "
                              f"this config writes to {own} (logger.tensorboard.log_dir); a checkpoint never chooses "
                              "where files go: resume with the log_dir the run started with, or start a new run.")


def write_hparams_experiment(folder: str | Path, hparams: Mapping[str, Sequence[Any] | tuple[float, float]],
                             metrics: Sequence[str]) -> None:
    """The HParams experiment of the sessions under `folder`: each hyperparameter with its discrete values (a
    list) or its interval (a `(low, high)` tuple), and the metrics to compare (scalar tags of the sessions)."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2
    from torch.utils.tensorboard import SummaryWriter

    infos = []
    for name, domain in hparams.items():
        if isinstance(domain, tuple):
            infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DATA_TYPE_FLOAT64,
                                            domain_interval=api_pb2.Interval(min_value=domain[0],
                                                                             max_value=domain[1])))
            continue
        values = list(domain)
        if all(isinstance(v, bool) for v in values):
            kind, items = api_pb2.DATA_TYPE_BOOL, [struct_pb2.Value(bool_value=v) for v in values]
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            kind, items = api_pb2.DATA_TYPE_FLOAT64, [struct_pb2.Value(number_value=v) for v in values]
        else:
            kind, items = api_pb2.DATA_TYPE_STRING, [struct_pb2.Value(string_value=str(v)) for v in values]
        infos.append(api_pb2.HParamInfo(name=name, type=kind, domain_discrete=struct_pb2.ListValue(values=items)))
    experiment = api_pb2.Experiment(hparam_infos=infos, time_created_secs=time.time(),
                                    metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics])
    writer = SummaryWriter(log_dir=str(folder))
    try:
        writer.file_writer.add_summary(_hparams_summary(experiment=experiment))
    finally:
        writer.close()


def _value(value: Any) -> Any:
    from google.protobuf import struct_pb2

    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=value)
    return struct_pb2.Value(string_value=str(value))


def _hparams_summary(experiment: Any = None, start: Any = None, end: Any = None) -> Any:
    """One HParams plugin summary (its experiment, a session's start or its end), built as TensorBoard's own
    `hparams.summary` builds it, without the TensorFlow that module imports."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    if experiment is not None:
        tag, data = metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)
    elif start is not None:
        tag, data = metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)
    else:
        tag, data = metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])


def read_rgb(path: str | Path):
    """A PNG as an (H, W, 3) uint8 array."""
    import numpy as np
    from matplotlib.image import imread

    img = imread(str(path))
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)

