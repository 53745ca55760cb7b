"""Says once when training waits for data: "loader-bound: N% of step time waiting for data; raise dataset.num_workers".

`LoaderWatch.wrap(loader)` yields the loader's batches unchanged and measures, per step, the time spent waiting
for the next batch against the time of the whole step (wait + the loop body). When, after `min_steps` steps, the
waiting share is above `threshold`, it logs one warning (per watch, i.e. per fit) naming the share and the key.

Where the clock is matters: on CPU the loop body runs synchronously, so host time is the truth. On CUDA the host
only enqueues kernels and would count GPU work it overlaps as "waiting"; there the watch records CUDA events on
the current stream instead (one where the host asks for the next batch, one when it has it), so the measured wait
is the GPU's idle time between steps, and the step is the GPU's time for it. Events are read lazily (only once
they have completed): the watch adds no synchronisation to the loop.

The first `skip_first` batches of each epoch are not counted: they wait for the workers to start (the
DataLoader starts them per epoch), which raising num_workers would not cure.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

log = logging.getLogger("segplat")


class HostTimeline:
    """Marks are host clock readings; every mark is ready at once."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def mark(self) -> float:
        return self.clock()

    def ready(self, mark: float) -> bool:
        return True

    def wait(self, mark: float) -> None:
        pass

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaTimeline:
    """Marks are CUDA events on the current stream: their distance is GPU time, read without synchronising."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def ready(self, mark: torch.cuda.Event) -> bool:
        return mark.query()

    def wait(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000.0


def timeline_for(device: torch.device | str | None) -> HostTimeline | CudaTimeline:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return CudaTimeline(dev) if dev.type == "cuda" else HostTimeline()


class LoaderWatch:
    """Accumulates data-wait vs step time over the batches it yields; warns once when the loader is the bottleneck.

    threshold: share of step time spent waiting above which it warns (0.1 = 10 %); min_steps: counted steps
    before it judges; skip_first: batches at the start of each epoch not counted (worker start-up)."""

    def __init__(self, device: torch.device | str | None = None, num_workers: int | None = None,
                 threshold: float = 0.10, min_steps: int = 20, skip_first: int = 2,
                 timeline: Any = None, logger: logging.Logger = log) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold} must be a fraction in (0, 1)")
        self.timeline = timeline if timeline is not None else timeline_for(device)
        self.num_workers = num_workers
        self.threshold = float(threshold)
        self.min_steps = int(min_steps)
        self.skip_first = int(skip_first)
        self.logger = logger
        self.wait_s = 0.0  # counted steps only
        self.step_s = 0.0  # wait + loop body, counted steps only
        self.steps = 0
        self.warned = False
        # (asked, got, next_asked): the wait is asked -> got, the step asked -> next_asked; read once all are ready
        self._pending: deque[tuple[Any, Any, Any]] = deque()

    @property
    def wait_fraction(self) -> float | None:
        """Share of the counted step time spent waiting for data (None before any step is counted)."""
        return self.wait_s / self.step_s if self.step_s > 0 else None

    def wrap(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Yield `iterable`'s items, timing each wait and each step; one call per epoch."""
        iterator = iter(iterable)
        tl = self.timeline
        previous: tuple[Any, Any] | None = None  # (asked, got) of the batch being worked on
        index = 0
        try:
            while True:
                asked = tl.mark()
                if previous is not None and index > self.skip_first:
                    self._pending.append((previous[0], previous[1], asked))
                    self._collect()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                previous = (asked, tl.mark())
                index += 1
                yield batch
        finally:  # the epoch's end (or a break out of it): read what is left; the loop syncs here anyway
            self._collect(block=True)

    def _collect(self, block: bool = False) -> None:
        tl = self.timeline
        if block and self._pending:
            tl.wait(self._pending[-1][2])
        while self._pending and tl.ready(self._pending[0][2]):
            asked, got, next_asked = self._pending.popleft()
            self.wait_s += max(0.0, tl.seconds(asked, got))
            self.step_s += max(0.0, tl.seconds(asked, next_asked))
            self.steps += 1
        self._judge()

    def _judge(self) -> None:
        fraction = self.wait_fraction
        if self.warned or self.steps < self.min_steps or fraction is None or fraction <= self.threshold:
            return
        self.warned = True
        now = f" (now {self.num_workers})" if self.num_workers is not None else ""
        self.logger.warning("loader-bound: %.0f%% of step time waiting for data; raise dataset.num_workers%s",
                            100 * fraction, now)

    def stats(self) -> dict[str, float]:
        """Totals so far (for a metrics record): counted steps, seconds waiting, seconds per step, the share."""
        fraction = self.wait_fraction
        return {"data/steps": float(self.steps), "data/wait_seconds": self.wait_s,
                "data/step_seconds": self.step_s / self.steps if self.steps else 0.0,
                "data/wait_fraction": fraction if fraction is not None else 0.0}
