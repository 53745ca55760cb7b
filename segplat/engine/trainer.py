"""The training loop on Accelerate.

One loop serves every model (inputs are `dict[str, Tensor]`), every launcher (python, accelerate
launch, torchrun, SLURM) and every precision. Facts it keeps:
- gradient accumulation is explicit: `no_sync` on every micro-batch but the last of a group, the
  schedule stepped once per optimiser step, a short last group at an epoch end is not carried over;
- validation uses the unwrapped model, so ranks with different numbers of validation batches never
  meet in a collective; the confusion matrices are summed once;
- decisions (best checkpoint, early stop) are taken from the summed metrics, so all ranks agree;
- only the main process writes; checkpoints are atomic and hold everything for an exact resume
  (their contents: `segplat.engine.checkpoint`); trackers run on the main process only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from segplat.engine import interrupt
from segplat.engine.acceleration import prepare_inputs, prepare_model, run_device
from segplat.engine.callbacks import Callback, EarlyStopping, improved
from segplat.engine.checkpoint import (
    BEST,
    LAST,
    ResumePoint,
    RunFacts,
    check_compatible,
    inference_state,
    resume_point,
    training_state,
)
from segplat.engine.checkpoint import save_checkpoint as write_checkpoint
from segplat.engine.forward import forward_batch
from segplat.engine.loader_watch import LoaderWatch
from segplat.engine.loggers import JsonlLogger, RunInfo, Tracker, format_metrics, sweep_facts
from segplat.errors import CheckpointError, ConfigError, SegplatError
from segplat.messages import first_line
from segplat.metrics import ConfusionMatrix, flatten_metrics
from segplat.rules import check_acceleration, check_monitor, check_sync_batchnorm
from segplat.schema import Hint, NonNegativeFloat, PositiveFloat, PositiveInt
from segplat.utils.console import say
from segplat.utils.io import atomic_write_json
from segplat.utils.seed import rng_state, set_rng_state

log = logging.getLogger("segplat")


class StopTraining(Exception):
    """Raised by a callback (e.g. a pruner) to end training at once with a reason."""

    def __init__(self, reason: str, status: str = "stopped") -> None:
        super().__init__(reason)
        self.status = status


class NonFiniteLoss(SegplatError):
    """The loss became NaN or infinite (trainer.nonfinite=stop): the run stops, its checkpoints keep the last
    finite state."""


# summary.json's status of a run stopped by a non-finite loss (the sweeper records it as a failed trial)
NONFINITE = "nonfinite_loss"


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimiser steps
    best_score: float | None = None
    best_epoch: int | None = None
    last_metrics: dict[str, Any] | None = None
    stopped_reason: str | None = None
    nonfinite_skipped: int = 0  # optimiser steps skipped for a non-finite loss (trainer.nonfinite=skip)


def resolve_mixed_precision(value: str, cpu: bool) -> str:
    """`auto`: bf16 where the device supports it, else full precision (the value is typed on `Trainer`)."""
    cuda = torch.cuda.is_available() and not cpu
    if value == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return value


def resolve_sync_batchnorm(value: str | bool, num_processes: int, on_gpu: bool) -> bool:
    """`auto`: SyncBatchNorm when several processes train on GPUs (`true` on CPU processes is refused by
    `segplat.rules.check_sync_batchnorm`)."""
    if value == "auto":
        return num_processes > 1 and on_gpu
    check_sync_batchnorm(value, num_processes, on_gpu)
    return bool(value) and num_processes > 1


class Trainer:
    """`trainer`: its keys are this constructor's arguments, typed below (checked with the config, before any run)."""

    def __init__(self, max_epochs: PositiveInt = 10,
                 mixed_precision: Annotated[Literal["auto", "no", "bf16", "fp16"],
                                            Hint("auto = bf16 where the device supports it")] = "auto",
                 accumulate_grad_batches: PositiveInt = 1, gradient_clip_val: NonNegativeFloat | None = 1.0,
                 val_every_n_epochs: PositiveInt = 1, resume: str | None = None, overwrite: bool = False,
                 progress: bool = True, limit_train_batches: PositiveInt | None = None,
                 limit_val_batches: PositiveInt | None = None, sync_batchnorm: Literal["auto"] | bool = "auto",
                 cpu: bool = False, backend: Literal["auto", "nccl", "gloo"] = "auto",
                 rendezvous_timeout: PositiveFloat = 120.0, dist_timeout: PositiveFloat = 1800.0,
                 compile: bool = False, channels_last: bool = False,
                 nonfinite: Annotated[Literal["stop", "skip"], Hint("what a NaN or infinite loss does")] = "stop"
                 ) -> None:
        check_acceleration(compile, run_device(cpu), mixed_precision)
        self.compile, self.channels_last = bool(compile), bool(channels_last)
        self.nonfinite = nonfinite  # a NaN/Inf loss stops the run, or its optimiser step is skipped and counted
        self.max_epochs = max_epochs
        self.mixed_precision = resolve_mixed_precision(mixed_precision, cpu)
        self.accumulate = accumulate_grad_batches
        self.clip = gradient_clip_val
        self.val_every = val_every_n_epochs
        self.resume = resume
        self.overwrite = bool(overwrite)
        self.progress = progress
        self.limit_train = limit_train_batches
        self.limit_val = limit_val_batches
        self.sync_batchnorm = sync_batchnorm
        self.backend = backend  # process group under a launcher: auto | nccl | gloo (see segplat.utils.dist)
        self.rendezvous_timeout = rendezvous_timeout
        self.dist_timeout = dist_timeout
        self.cpu = cpu
        self.state = TrainState()
        self.callbacks: list[Callback] = []
        self.loggers: list[Tracker] = []
        self.monitor = "val/miou"
        self.mode = "max"
        self.facts = RunFacts()
        self.resumed = False
        self.saved_epoch = 0  # the epoch checkpoints/last.ckpt holds (0: none yet)
        self.where = "before the first epoch"  # where the loop is, for the sentence of an interrupted run
        self._accelerator = None
        self._start: tuple[Path, ResumePoint] | None = None

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs

            from segplat.utils.dist import init_distributed

            # join the group ourselves (backend fallback, rendezvous timeout naming the address); Accelerate
            # reuses it. Several processes without CUDA must tell Accelerate cpu=True, or each would train alone.
            backend = init_distributed(self.backend, self.cpu, self.rendezvous_timeout, self.dist_timeout)
            cpu = self.cpu or (backend is not None and not torch.cuda.is_available())
            self._accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=cpu,
                                            step_scheduler_with_optimizer=False,
                                            kwargs_handlers=[DistributedDataParallelKwargs(
                                                find_unused_parameters=False)])
            acc = self._accelerator
            self.use_sync_batchnorm = resolve_sync_batchnorm(self.sync_batchnorm, acc.num_processes,
                                                             acc.device.type == "cuda")
        return self._accelerator

    def prepare_run(self, run_dir: str | Path) -> ResumePoint:
        """Where this run starts, decided once and before any data is read: `trainer.resume` resolved, the
        run-folder rule applied (see `segplat.engine.checkpoint.resume_point`), stale temporary files removed."""
        run_dir = Path(run_dir)
        if self._start is None or self._start[0] != run_dir:
            from segplat.utils.dist import is_main_process

            self._start = (run_dir, resume_point(run_dir, self.resume, self.overwrite, is_main_process()))
        return self._start[1]

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, model: nn.Module, datamodule, loss_fn: nn.Module, optimizer_factory: Callable[..., Any],
            scheduler_factory: Callable[..., Any] | None, run_dir: str | Path, callbacks: Sequence[Callback] = (),
            monitor: str = "val/miou", mode: str = "max", loggers: Sequence[Tracker] = (),
            facts: RunFacts | None = None) -> float:
        """Train to `max_epochs` (or a stop); returns the best monitored score (NaN when never validated)."""
        start = self.prepare_run(run_dir)
        self.run_dir = Path(run_dir)
        self.monitor, self.mode = monitor, mode
        self.facts = facts or RunFacts()
        # stable sort on `order`: ModelCheckpoint runs last, so checkpoints hold every callback's updated state
        self.callbacks = sorted(callbacks, key=lambda cb: getattr(cb, "order", 0))
        self.setup(model, datamodule, loss_fn, optimizer_factory, scheduler_factory)
        state = start.take()
        if state is not None:
            self.load_state(state, start.path)
        self.start_loggers(loggers, state)
        status = "failed"
        interrupt.clear()
        try:
            with interrupt.deferred():  # SIGINT / SIGTERM: a stop at the end of the step (segplat.engine.interrupt)
                for cb in self.callbacks:
                    cb.on_fit_start(self)
                status = self.run_epochs()
                for cb in self.callbacks:
                    cb.on_fit_end(self)
            self.write_summary(status)
            self.say_end(status)
        except KeyboardInterrupt as stop:
            status = interrupt.STATUS
            self.end_with(status, self.interrupted_reason(stop), warn=True)
            stop.reported = True
            raise
        except NonFiniteLoss as err:
            status = NONFINITE
            self.end_with(status, str(err))
            raise
        except Exception as err:
            if interrupt.requested() is None:
                raise
            # a signal asked for the stop and something broke on the way there (a collective with a rank that was
            # killed outright, a loader worker killed by the launcher): the run was interrupted, not broken
            status = interrupt.STATUS
            stop = interrupt.Interrupted(interrupt.requested())
            self.end_with(status, f"{self.interrupted_reason(stop)} ({type(err).__name__}: {first_line(err)})",
                          warn=True)
            stop.reported = True
            raise stop from err
        finally:
            self.finish_loggers(status)
        self.accelerator.wait_for_everyone()
        score = self.state.best_score
        return float(score) if score is not None else float("nan")

    def end_with(self, status: str, reason: str, warn: bool = False) -> None:
        """A run that ends before its last epoch: summary.json says why (the sweeper reads it)."""
        self.state.stopped_reason = reason
        self.write_summary(status)
        if warn and self.accelerator.is_main_process:
            log.warning(reason)

    def interrupted_reason(self, stop: BaseException) -> str:
        saved = self.saved_epoch
        kept = (f"checkpoints/{LAST} holds epoch {saved}" if saved else f"no checkpoints/{LAST} yet")
        return (f"interrupted by {interrupt.signal_name(interrupt.signum_of(stop))} {self.where}; {kept}: continue "
                f"with trainer.resume=auto and the same run_name (run folder {self.run_dir})")

    def say_end(self, status: str) -> None:
        """The run's last line before `run_dir:`, on the console and in the log file."""
        if not self.accelerator.is_main_process:
            return
        best = "" if self.state.best_score is None else \
            f"; best {self.monitor} {self.state.best_score:.4f} at epoch {self.state.best_epoch}"
        skipped = f"; {self.state.nonfinite_skipped} optimiser step(s) skipped for a non-finite loss" \
            if self.state.nonfinite_skipped else ""
        say(f"{status}: {self.state.epoch}/{self.max_epochs} epochs, {self.state.global_step} steps{best}{skipped}")

    def setup(self, model: nn.Module, datamodule, loss_fn: nn.Module, optimizer_factory: Callable[..., Any],
              scheduler_factory: Callable[..., Any] | None) -> None:
        """Loaders, the wrapped model and optimiser, the schedule, the loss and the device preprocessing."""
        acc = self.accelerator
        self.datamodule = datamodule
        self.class_names = list(datamodule.info.classes)
        self.ignore_index = datamodule.info.ignore_index
        if self.use_sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # in place, after any module surgery and before DDP wraps it: checkpoint keys stay the model's own
        model = prepare_model(model, compile=self.compile, channels_last=self.channels_last, device=acc.device)
        self.raw_model = model
        self.optimizer_factory = optimizer_factory
        optimizer = optimizer_factory(model)
        self.train_loader = datamodule.train_loader(acc.process_index, acc.num_processes)
        self.val_loader = datamodule.val_loader(acc.process_index, acc.num_processes)
        for loader in (self.train_loader, self.val_loader):
            interrupt.quiet_workers(loader)  # Ctrl-C reaches the main process's decision only
        self.loader_watch = LoaderWatch(acc.device, num_workers=getattr(datamodule, "num_workers", None))
        n_batches = len(self.train_loader)
        if self.limit_train:
            n_batches = min(n_batches, self.limit_train)
        if n_batches == 0:
            raise ConfigError(f"the training split gives no batch of dataset.batch_size={datamodule.batch_size} "
                              f"on {acc.num_processes} process(es); lower the batch size.")
        self.n_train_batches = n_batches
        self.steps_per_epoch = math.ceil(n_batches / self.accumulate)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = scheduler_factory(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                           else self.optimizer, total_steps=self.steps_per_epoch * self.max_epochs,
                                           steps_per_epoch=self.steps_per_epoch) if scheduler_factory else None
        self.loss_fn = loss_fn.to(acc.device)
        self.preprocess = datamodule.preprocessor()

    def run_epochs(self) -> str:
        """Epochs until max_epochs, an early stop or a StopTraining; returns the run's status."""
        if self.state.stopped_reason:  # a resumed run that had stopped early: nothing to train
            if self.accelerator.is_main_process:
                log.info("the run stopped early at epoch %d (%s); nothing to train: raise "
                         "callbacks.early_stopping.patience to go on", self.state.epoch, self.state.stopped_reason)
            return "stopped_early"
        try:
            while self.state.epoch < self.max_epochs:
                epoch = self.state.epoch + 1
                self.where = f"during epoch {epoch}"
                self.model.train()  # before the hooks, which may hold some modules in eval mode (a frozen encoder's BN)
                for cb in self.callbacks:
                    cb.on_train_epoch_start(self)
                train_stats = self.train_epoch(epoch)
                self.state.epoch = epoch
                for cb in self.callbacks:
                    cb.on_train_epoch_end(self)
                if epoch % self.val_every == 0 or epoch == self.max_epochs:
                    self.where = f"in epoch {epoch}'s validation"
                    self.validate_and_record(epoch, train_stats)
                self.where = f"after epoch {epoch}"
                if self.state.stopped_reason:
                    return "stopped_early"
        except StopTraining as stop:
            self.state.stopped_reason = str(stop)
            return stop.status
        return "completed"

    def train_epoch(self, epoch: int) -> dict[str, float]:
        acc = self.accelerator  # the model is in training mode (run_epochs sets it before the epoch's hooks)
        self.train_loader.sampler.set_epoch(epoch)
        self.train_loader.dataset.set_epoch(epoch)
        n = self.n_train_batches
        loss_sum = torch.zeros((), device=acc.device)
        finite = torch.zeros((), device=acc.device)  # micro-batches with a finite loss
        show = self.progress and acc.is_main_process
        bar = tqdm(total=n, desc=f"train {epoch}/{self.max_epochs}", disable=not show, leave=False, dynamic_ncols=True)
        started = time.time()
        group_start = 0
        group: list[tuple[int, torch.Tensor, Mapping[str, torch.Tensor]]] = []  # this step's (batch, loss, parts)
        skipped = 0
        for i, batch in enumerate(self.loader_watch.wrap(self.train_loader)):  # says once when data is the limit
            if i >= n:
                break
            if i % self.accumulate == 0:
                group_start = i
            group_len = min(self.accumulate, n - group_start)
            sync = (i - group_start + 1) == group_len
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            # a distinct augmentation stream per rank (equal to step=i on one process)
            inputs = self.preprocess(batch, train=True, epoch=epoch, step=i * acc.num_processes + acc.process_index)
            inputs = prepare_inputs(inputs, self.channels_last)
            ctx = acc.no_sync(self.model) if not sync and acc.num_processes > 1 else nullcontext()
            with ctx, acc.autocast():
                outputs = self.model(inputs)
                loss, parts = self.loss_fn(outputs, batch["label"].long())
                acc.backward(loss / group_len)
            loss = loss.detach()
            ok = torch.isfinite(loss)
            loss_sum += torch.where(ok, loss, torch.zeros_like(loss))
            finite += ok
            group.append((i, loss, parts))
            if sync:
                # every micro-batch of the step has run its backward (DDP's collectives stay in step on every rank);
                # the step's update is taken only if no rank asked to stop and every loss of it was finite
                if self.step_allowed(epoch, n, group):
                    if self.clip:
                        acc.clip_grad_norm_(self.model.parameters(), self.clip)
                    self.optimizer.step()
                else:
                    skipped += 1
                # a skipped step keeps its place in the schedule: the run's length and learning rates stay as planned
                if self.scheduler is not None and self.scheduler.interval == "step":
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.global_step += 1
                group = []
            bar.update(1)
            if bar.n % 10 == 0 or bar.n == n:
                bar.set_postfix(loss=f"{loss_sum.item() / max(finite.item(), 1):.4f}")
        bar.close()
        if skipped and skipped == self.steps_per_epoch:
            raise NonFiniteLoss(f"every optimiser step of epoch {epoch} ({skipped}) had a non-finite loss and was "
                                f"skipped (trainer.nonfinite=skip), so nothing trains any more; {self.kept_state()}: "
                                "lower optimizer.lr, or check the data and the loss.")
        totals = torch.stack([loss_sum, finite])
        totals = acc.reduce(totals, "sum") if acc.num_processes > 1 else totals
        stats = {"train/loss": (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan"),
                 "train/seconds": time.time() - started}
        if self.nonfinite == "skip":
            stats["train/nonfinite_skipped"] = skipped
        return stats

    def agreed_stop(self, nonfinite: torch.Tensor | None = None) -> tuple[int, bool]:
        """(signal that asked for a stop on any rank or 0, a non-finite loss on any rank): one transfer from the
        device per optimiser step, and one small collective when several processes train."""
        acc = self.accelerator
        signum = interrupt.requested() or 0
        bad = nonfinite if nonfinite is not None else torch.zeros((), dtype=torch.bool, device=acc.device)
        if acc.num_processes == 1:
            return signum, bool(bad)
        flags = torch.stack([torch.tensor(float(signum), device=acc.device), bad.float()])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signum, flag = flags.tolist()
        return int(signum), flag > 0

    def check_stop(self) -> None:
        """Every rank stops together when any of them was asked to (SIGINT / SIGTERM)."""
        signum, _ = self.agreed_stop()
        if signum:
            raise interrupt.Interrupted(signum)

    def step_allowed(self, epoch: int, n: int, group: Sequence[tuple[int, torch.Tensor, Mapping[str, Any]]]) -> bool:
        """False when the step's loss was non-finite and trainer.nonfinite=skip; raises to stop the run for a
        signal or (trainer.nonfinite=stop) a non-finite loss."""
        bad = torch.stack([~torch.isfinite(loss) for _, loss, _ in group]).any()
        signum, nonfinite = self.agreed_stop(bad)
        if signum:
            raise interrupt.Interrupted(signum)
        if not nonfinite:
            return True
        what = self.nonfinite_what(epoch, n, group)
        if self.nonfinite == "stop":
            raise NonFiniteLoss(f"{what}; {self.kept_state()}: lower optimizer.lr (or check the data and the loss), "
                                "or set trainer.nonfinite=skip to skip such steps.")
        self.state.nonfinite_skipped += 1
        if self.accelerator.is_main_process:
            log.warning("%s; the step is skipped (trainer.nonfinite=skip; %d skipped so far)", what,
                        self.state.nonfinite_skipped)
        return False

    def nonfinite_what(self, epoch: int, n: int, group: Sequence[tuple[int, torch.Tensor, Mapping[str, Any]]]) -> str:
        """Where the first non-finite loss of a step was, its terms and the learning rates, in one clause."""
        first = next(((i, loss, parts) for i, loss, parts in group if not torch.isfinite(loss)), None)
        if first is None:
            where, value = "on another process", ""
        else:
            i, loss, parts = first
            terms = ", ".join(f"{name} {float(v):.4g}" for name, v in parts.items())
            where, value = f"at batch {i + 1}/{n}", f": loss {float(loss):.4g}" + (f" ({terms})" if terms else "")
        lrs = ", ".join(f"{g.get('name', 'group')} {g['lr']:.3g}" for g in self.optimizer.param_groups)
        return (f"the loss became non-finite in epoch {epoch} {where} (optimiser step {self.state.global_step + 1})"
                f"{value}; learning rates {lrs}")

    def kept_state(self) -> str:
        """Which checkpoint holds the last finite state (nothing is saved after a non-finite loss)."""
        if not self.saved_epoch:
            return "no checkpoint was written before it"
        return f"checkpoints/{LAST} keeps epoch {self.saved_epoch}, the last finite state"

    @torch.no_grad()
    def evaluate(self, loader=None, limit: int | None = None) -> dict[str, Any]:
        """Confusion matrix and mean loss over a loader, summed across ranks."""
        acc = self.accelerator
        loader = loader or self.val_loader
        model = acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        cm = ConfusionMatrix(len(self.class_names), self.ignore_index, acc.device)
        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        pixels = torch.zeros((), device=acc.device, dtype=torch.float64)
        limit = limit if limit is not None else self.limit_val
        for i, batch in enumerate(tqdm(loader, desc="validate", leave=False, dynamic_ncols=True,
                                       disable=not (self.progress and acc.is_main_process))):
            if (limit is not None and i >= limit) or interrupt.requested():  # validate_and_record stops every rank
                break
            # the forward evaluation and prediction share: what validation measures is what predict writes
            logits = forward_batch(model, self.preprocess, batch, acc.device, autocast=acc.autocast)
            label = batch["label"].to(acc.device, non_blocking=True)
            loss, _ = self.loss_fn({"out": logits}, label.long())
            cm.update(logits, label)
            # weight by labelled pixels: a per-pixel loss then averages exactly as over one batch of everything,
            # whatever the batching or the number of ranks (windows hold different numbers of labelled pixels)
            n = (label != self.ignore_index).sum()
            loss_sum += loss.double() * n
            pixels += n
        model.train(was_training)
        matrix = acc.reduce(cm.matrix, "sum") if acc.num_processes > 1 else cm.matrix
        totals = acc.reduce(torch.stack([loss_sum, pixels]), "sum") if acc.num_processes > 1 else \
            torch.stack([loss_sum, pixels])
        cm.matrix = matrix
        result = cm.compute(self.class_names)
        result["loss"] = float(totals[0] / totals[1].clamp(min=1))
        return result

    def validate_and_record(self, epoch: int, train_stats: Mapping[str, float]) -> dict[str, float]:
        acc = self.accelerator
        started = time.time()
        result = self.evaluate()
        self.check_stop()  # a signal during validation: every rank leaves before anything is recorded
        flat = flatten_metrics(result)
        flat["val/seconds"] = time.time() - started
        record: dict[str, Any] = {"epoch": epoch, "step": self.state.global_step, **train_stats, **flat}
        for g in self.optimizer.param_groups:
            record[f"lr/{g.get('name', 'group')}"] = g["lr"]
        if self.monitor not in record:
            check_monitor(self.monitor, self.class_names)  # the sentence with the valid names
            raise ConfigError(f"callbacks.monitor={self.monitor} was not logged by this validation.")
        value = record[self.monitor]
        if improved(value, self.state.best_score, self.mode):
            self.state.best_score, self.state.best_epoch = float(value), epoch
        self.state.last_metrics = {k: result[k] for k in ("miou", "pixel_accuracy", "mean_f1", "per_class_iou",
                                                          "per_class_f1", "loss", "confusion_matrix")}
        if self.scheduler is not None and self.scheduler.interval == "validation":
            self.scheduler.step(value)
        record["best"] = self.state.best_score
        record["best_epoch"] = self.state.best_epoch
        if acc.is_main_process:
            self.track("log_metrics", record, self.state.global_step)
            keys = ["train/loss", "val/loss", "val/miou", "val/pixel_accuracy"]
            if self.monitor not in keys:
                keys.append(self.monitor)
            line = format_metrics(epoch, self.max_epochs, record, keys)
            skipped = train_stats.get("train/nonfinite_skipped")
            say(f"{line} | best {self.state.best_score:.4f} @ {self.state.best_epoch} | "
                f"{train_stats.get('train/seconds', 0) + flat['val/seconds']:.1f}s"
                + (f" | {skipped} non-finite step(s) skipped" if skipped else ""))
        for cb in self.callbacks:
            cb.on_validation_end(self, record)
        return record

    def request_stop(self, reason: str) -> None:
        self.state.stopped_reason = reason
        if self.accelerator.is_main_process:
            say(reason)

    # -- trackers -------------------------------------------------------------------------------
    def start_loggers(self, loggers: Sequence[Tracker], state: Mapping[str, Any] | None) -> None:
        """Start the trackers on the main process (metrics.jsonl always), continuing their runs on a resume."""
        if not self.accelerator.is_main_process:
            self.loggers = []
            return
        loggers = list(loggers)
        self.loggers = loggers if any(isinstance(lg, JsonlLogger) for lg in loggers) else [JsonlLogger(), *loggers]
        config = yaml.safe_load(self.facts.config) if self.facts.config else {}
        saved = (state or {}).get("loggers") or {}
        for lg in self.loggers:
            lg.start(RunInfo(self.run_dir, self.run_dir.name, config, [str(t) for t in config.get("tags") or []],
                             sweep_facts(config), self.monitor, resuming=state is not None,
                             resume_step=self.state.global_step, resume_epoch=self.state.epoch,
                             resume_state=saved.get(lg.name)))

    def track(self, method: str, *args: Any) -> None:
        """Call `method` on every tracker. A tracker that fails (a server gone away) is dropped with a warning,
        so a long run is not lost to it; metrics.jsonl (required) stops the run instead."""
        for lg in list(self.loggers):
            try:
                getattr(lg, method)(*args)
            except Exception as err:
                if lg.required:
                    raise
                log.warning("logger.%s failed in %s (%s: %s); the run goes on without it", lg.name, method,
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self.loggers.remove(lg)

    def finish_loggers(self, status: str) -> None:
        best = self.run_dir / "checkpoints" / BEST
        self.track("log_summary", {"status": status, "best_checkpoint": str(best) if best.is_file() else None,
                                   "best_score": self.state.best_score, "best_epoch": self.state.best_epoch})
        self.track("finish", status)

    # -- state ----------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        acc = self.accelerator
        return training_state(
            self.facts, model=acc.unwrap_model(self.model).state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
            rng=rng_state(), trainer=asdict(self.state),
            callbacks={cb.name: cb.state_dict() for cb in self.callbacks},
            loggers={lg.name: lg.state_dict() for lg in self.loggers})

    def save_checkpoints(self, last: bool = True, best: bool = False) -> None:
        """`last.ckpt` (full resume state) first, then `best.ckpt` (its inference part): a kill between the two
        leaves a resumable run whose best is rewritten on resume (see ModelCheckpoint.on_fit_start)."""
        acc = self.accelerator
        if last or best:
            self.check_weights_finite()
        if acc.is_main_process and (last or best):
            state = self.checkpoint_state()
            if last:
                write_checkpoint(self.run_dir / "checkpoints" / LAST, state)
            if best:
                write_checkpoint(self.run_dir / "checkpoints" / BEST, inference_state(state))
        if last:
            self.saved_epoch = self.state.epoch
        acc.wait_for_everyone()

    def check_weights_finite(self) -> None:
        """A checkpoint never holds NaN or infinite weights (a finite loss can hide them, e.g. behind BatchNorm):
        the run stops and the checkpoints keep the last finite state."""
        params = list(self.raw_model.named_parameters())
        if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):  # one transfer
            return
        for name, p in params:
            if not torch.isfinite(p).all():
                raise NonFiniteLoss(f"the weights became non-finite by the end of epoch {self.state.epoch} ({name}), "
                                    f"though the loss stayed finite; nothing was saved and {self.kept_state()}: lower "
                                    "optimizer.lr, or check the data and the loss.")

    def load_state(self, state: dict[str, Any], path: Path | None = None) -> None:
        """Restore a training state (loaded once by `ResumePoint`) into the prepared model, optimiser, schedule,
        callbacks and RNG."""
        acc = self.accelerator
        check_compatible(state, self.facts.meta, str(path))
        try:
            acc.unwrap_model(self.model).load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path} does not fit this model ({first_line(err)}); use the "
                                  "config it was trained with or start a new run.") from err
        for cb in self.callbacks:  # e.g. a fine-tuning switch that must re-add its param group first
            restore = getattr(cb, "before_optimizer_restore", None)
            if restore is not None:
                restore(self, state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(state["scaler"])
        known = set(asdict(TrainState()))
        for key, value in state["trainer"].items():
            if key not in known:
                raise CheckpointError(f"checkpoint {path} holds trainer.{key}, which this version of segplat does not "
                                      "know; resume with the version that wrote it, or start a new run.")
            setattr(self.state, key, value)
        if path is not None and Path(path).resolve() == (self.run_dir / "checkpoints" / LAST).resolve():
            self.saved_epoch = self.state.epoch
        cb_states = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.name in cb_states:
                cb.load_state_dict(cb_states[cb.name])
        # an early-stopped run stays stopped unless early stopping would now let it go on (a larger patience);
        # a requeue that always passes trainer.resume=auto must not train a finished run further
        if not (self.state.stopped_reason and self.state.stopped_reason.startswith("early stopping") and any(
                cb.wait >= cb.patience for cb in self.callbacks if isinstance(cb, EarlyStopping))):
            self.state.stopped_reason = None
        set_rng_state(state["rng"])
        self.resumed = True
        if acc.is_main_process:
            log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.global_step)

    def write_summary(self, status: str) -> None:
        if not self.accelerator.is_main_process:
            return
        last = self.state.last_metrics or {}
        summary = {
            "status": status,
            "monitor": self.monitor,
            "mode": self.mode,
            "best_score": self.state.best_score,
            "best_epoch": self.state.best_epoch,
            "epochs_completed": self.state.epoch,
            "checkpoint_epoch": self.saved_epoch,  # the epoch checkpoints/last.ckpt holds: where a resume starts
            "global_step": self.state.global_step,
            "stopped_reason": self.state.stopped_reason,
            "nonfinite_skipped": self.state.nonfinite_skipped,
            # a second sweep objective (model size), besides the monitored score
            "num_parameters": sum(p.numel() for p in self.raw_model.parameters()),
            "miou": last.get("miou"),
            "pixel_accuracy": last.get("pixel_accuracy"),
            "mean_f1": last.get("mean_f1"),
            "per_class_iou": last.get("per_class_iou"),
            "per_class_f1": last.get("per_class_f1"),
            "val_loss": last.get("loss"),
            "confusion_matrix": last.get("confusion_matrix"),
            "classes": self.class_names,
            "checkpoints": {p.name: str(p) for p in sorted((self.run_dir / "checkpoints").glob("*.ckpt"))},
            "run_dir": str(self.run_dir),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
