"""The Trainer's loop overhead: an epoch of `segplat.engine.Trainer` vs a hand-written PyTorch loop (goal <= 1.05x).

    python -m benchmarks.loop_overhead [--rounds 4] [overrides of conf/train.yaml ...]

Both loops run over the very same objects, set up once by `Trainer.fit` (one epoch, which is also the warm-up):
the train loader (workers, crops, augmentation, collate), the device preprocessor, the model, the loss, the
optimiser and the schedule. The hand-written loop does what any PyTorch loop does per batch: move to the device,
preprocess, forward, loss, backward, clip, optimiser step, schedule step, zero_grad. The Trainer's epoch
(`Trainer.train_epoch`) adds Accelerate's backward/clip wrappers, the accumulation bookkeeping, the loss
accumulator and its progress bar (disabled). Callbacks are off (none passed), loggers off. Rounds alternate the two
(the order flips each round); the ratio is of the median epoch times. Defaults: the default recipe
(`dataset=synthetic model=unet`, workers 1) on CPU (`trainer=cpu`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from benchmarks.common import compose_train, machine_line, markdown_table


def manual_epoch(trainer, epoch: int) -> float:
    """A plain PyTorch epoch over the trainer's own loader, preprocessor, model, loss, optimiser and schedule."""
    model, loss_fn, preprocess = trainer.model, trainer.loss_fn, trainer.preprocess
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # the torch optimiser itself
    scheduler, clip, device = trainer.scheduler, trainer.clip, trainer.accelerator.device
    loader = trainer.train_loader
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    model.train()
    started = time.perf_counter()
    for i, batch in enumerate(loader):
        if i >= trainer.n_train_batches:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        inputs = preprocess(batch, train=True, epoch=epoch, step=i)
        loss, _ = loss_fn(model(inputs), batch["label"].long())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None and scheduler.interval == "step":
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()  # wait for the last step (a no-op on CPU)
    return time.perf_counter() - started


def trainer_epoch(trainer, epoch: int) -> float:
    started = time.perf_counter()
    trainer.model.train()  # as Trainer.run_epochs does before each epoch
    trainer.train_epoch(epoch)
    return time.perf_counter() - started


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads, not the loader's worker processes).

    The loop's own overhead is CPU work in this process, so the CPU figure is the steadier one on a shared machine;
    the wall figure includes any wait for the workers, which both loops share."""
    cpu = time.process_time()
    wall = fn(*args)
    return wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loop_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="conf/train.yaml overrides (default: the default recipe on CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="segplat_loop_overhead_"))
    overrides = ["trainer=cpu", "trainer.progress=false", "logger=none", "trainer.max_epochs=1",
                 "trainer.limit_val_batches=1", *args.overrides]
    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.dataset.store_dir = str(tmp / "stores")
    torch.manual_seed(int(cfg.seed))
    trainer = instantiate(cfg.trainer)
    datamodule = instantiate(cfg.dataset)
    info = datamodule.setup(trainer.accelerator)
    model = instantiate(cfg.model, modalities=info.modalities, num_classes=info.num_classes)
    loss = instantiate(cfg.loss)
    loss.bind_aux_outputs(model.aux_outputs, type(model).__name__)
    loss.set_ignore_index(info.ignore_index)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    (tmp / "run").mkdir(parents=True)  # as segplat.train does before fit
    print(f"# {machine_line()}")
    print(f"# overrides: {' '.join(overrides)}")
    t = time.perf_counter()
    trainer.fit(model, datamodule, loss, instantiate(cfg.optimizer), scheduler, tmp / "run", callbacks=[],
                monitor=cfg.callbacks.monitor, mode=cfg.callbacks.mode)  # set-up + warm-up epoch
    print(f"# set-up and warm-up epoch (fit, max_epochs=1, with validation): {time.perf_counter() - t:.1f} s; "
          f"{trainer.n_train_batches} batches of {datamodule.batch_size} per epoch, {datamodule.num_workers} workers")
    times: dict[str, list[float]] = {"trainer": [], "hand-written": []}
    cpu: dict[str, list[float]] = {"trainer": [], "hand-written": []}
    epoch = 1
    for r in range(args.rounds):
        order = ["trainer", "hand-written"] if r % 2 == 0 else ["hand-written", "trainer"]
        for which in order:
            epoch += 1
            wall, cpu_s = timed(trainer_epoch if which == "trainer" else manual_epoch, trainer, epoch)
            times[which].append(wall)
            cpu[which].append(cpu_s)
            print(f"round {r + 1} {which}: {wall:.2f} s wall, {cpu_s:.2f} s CPU (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["trainer"] / med["hand-written"]
    ratio_cpu = med_cpu["trainer"] / med_cpu["hand-written"]
    print()
    print(markdown_table(["loop", "epoch wall s (median)", "epoch CPU s (median)", "all epochs wall s",
                          "all epochs CPU s"],
                         [[k, f"{med[k]:.2f}", f"{med_cpu[k]:.2f}", ", ".join(f"{x:.2f}" for x in v),
                           ", ".join(f"{x:.2f}" for x in cpu[k])] for k, v in times.items()]))
    print(f"\nTrainer / hand-written = {ratio:.3f}x wall, {ratio_cpu:.3f}x CPU (goal <= 1.05x: "
          f"{'met' if max(ratio, ratio_cpu) <= 1.05 else 'NOT met'})")
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
