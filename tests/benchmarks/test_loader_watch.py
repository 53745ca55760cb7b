"""LoaderWatch: the loader-bound warning is given once when waiting dominates, never when it does not."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from segplat.engine.loader_watch import HostTimeline, LoaderWatch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowIterable:
    """Each item costs `wait` seconds of the fake clock to produce."""

    def __init__(self, clock: FakeClock, n: int, wait: float, first_wait: float | None = None) -> None:
        self.clock, self.n, self.wait, self.first_wait = clock, n, wait, first_wait

    def __iter__(self):
        for i in range(self.n):
            self.clock.now += self.first_wait if (i == 0 and self.first_wait is not None) else self.wait
            yield i


def run_epoch(watch: LoaderWatch, data, clock: FakeClock, body: float) -> list[int]:
    seen = []
    for item in watch.wrap(data):
        clock.now += body  # the training step
        seen.append(item)
    return seen


def loader_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "loader-bound" in r.getMessage()]


def test_warns_once_with_the_share_and_the_key(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    watch = LoaderWatch(num_workers=2, min_steps=10, skip_first=2, timeline=HostTimeline(clock))
    with caplog.at_level(logging.WARNING, logger="segplat"):
        for _ in range(3):  # three epochs: still one warning
            assert run_epoch(watch, SlowIterable(clock, 12, wait=3.0), clock, body=1.0) == list(range(12))
    assert loader_warnings(caplog) == [
        "loader-bound: 75% of step time waiting for data; raise dataset.num_workers (now 2)"]
    assert watch.steps == 3 * 10  # the first two batches of each epoch are not counted
    assert watch.wait_fraction == pytest.approx(0.75)
    stats = watch.stats()
    assert stats["data/step_seconds"] == pytest.approx(4.0)
    assert stats["data/wait_seconds"] == pytest.approx(90.0)


def test_no_warning_when_the_step_dominates(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    watch = LoaderWatch(min_steps=5, timeline=HostTimeline(clock))
    with caplog.at_level(logging.WARNING, logger="segplat"):
        run_epoch(watch, SlowIterable(clock, 40, wait=0.05, first_wait=30.0), clock, body=1.0)
    assert loader_warnings(caplog) == []
    assert watch.wait_fraction == pytest.approx(0.05 / 1.05)  # the slow first batch (worker start) is skipped


def test_judges_only_after_min_steps(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    watch = LoaderWatch(min_steps=50, timeline=HostTimeline(clock))
    with caplog.at_level(logging.WARNING, logger="segplat"):
        run_epoch(watch, SlowIterable(clock, 30, wait=5.0), clock, body=1.0)
        assert loader_warnings(caplog) == []  # 28 counted steps < 50
        run_epoch(watch, SlowIterable(clock, 30, wait=5.0), clock, body=1.0)
    assert len(loader_warnings(caplog)) == 1
    assert "83%" in loader_warnings(caplog)[0]


def test_early_break_keeps_counts_consistent() -> None:
    clock = FakeClock()
    watch = LoaderWatch(min_steps=1, skip_first=0, timeline=HostTimeline(clock))
    for i, _ in enumerate(watch.wrap(SlowIterable(clock, 100, wait=1.0))):
        if i >= 5:
            break  # as the trainer does at limit_train_batches
        clock.now += 1.0
    assert watch.steps == 5 and watch.wait_fraction == pytest.approx(0.5)


class DeferredTimeline(HostTimeline):
    """Marks become readable only when released, as CUDA events complete after the GPU reaches them."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.released = -1.0

    def ready(self, mark: float) -> bool:
        return mark <= self.released

    def wait(self, mark: float) -> None:  # as event.synchronize() at the epoch's end
        self.released = max(self.released, mark)


def test_device_marks_are_read_only_once_complete(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    timeline = DeferredTimeline(clock)
    watch = LoaderWatch(min_steps=3, skip_first=0, timeline=timeline)
    data = SlowIterable(clock, 10, wait=2.0)
    it = watch.wrap(data)
    for _ in range(6):
        next(it)
        clock.now += 1.0
    assert watch.steps == 0  # nothing complete yet: nothing read, no synchronisation forced
    timeline.released = clock.now
    with caplog.at_level(logging.WARNING, logger="segplat"):
        next(it)
        assert watch.steps == 6  # the six steps whose marks completed (the 6th ended when released)
        clock.now += 1.0
        for _ in it:
            clock.now += 1.0
    assert watch.steps == 10  # the rest read at the epoch's end
    assert watch.wait_fraction == pytest.approx(2 / 3)
    assert len(loader_warnings(caplog)) == 1


class SleepyDataset(Dataset):
    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.full((2,), float(i))


def test_real_dataloader_slower_than_the_step_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    loader = DataLoader(SleepyDataset(28, 0.02), batch_size=1, num_workers=0)
    watch = LoaderWatch(device="cpu", num_workers=0, min_steps=20)
    got = []
    with caplog.at_level(logging.WARNING, logger="segplat"):
        for batch in watch.wrap(loader):
            time.sleep(0.002)
            got.append(int(batch[0, 0]))
    assert got == list(range(28))
    assert watch.wait_fraction > 0.5  # ~0.9 on an idle machine; waiting clearly dominates
    assert len(loader_warnings(caplog)) == 1 and "raise dataset.num_workers (now 0)" in loader_warnings(caplog)[0]


def test_threshold_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="threshold"):
        LoaderWatch(threshold=10)
