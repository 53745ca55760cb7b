"""Ctrl-C (SIGINT) and SIGTERM at a random moment: the run stops within seconds, with no traceback, exit status
130 / 143 and summary.json `interrupted`; `trainer.resume=auto` then ends exactly where an uninterrupted run does."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from segplat.engine.checkpoint import load_checkpoint
from segplat.engine.interrupt import Interrupted, quiet_workers, signals_handled
from tests.engine.runs import QUICK, records, run_cli, start_cli, summary, wait_until

EPOCHS = 6
# loader workers too: a terminal's Ctrl-C reaches them as well
COMMON = [*QUICK, f"trainer.max_epochs={EPOCHS}", "dataset.num_workers=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never interrupted."""
    cwd = tmp_path_factory.mktemp("straight")
    proc = run_cli([*COMMON, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def assert_same_end(a: Path, b: Path, what: str) -> None:
    sa, sb = summary(a), summary(b)
    assert sb["status"] == "completed" and sb["epochs_completed"] == EPOCHS, what
    for key in ("miou", "val_loss", "pixel_accuracy", "global_step", "best_score", "best_epoch"):
        assert sb[key] == pytest.approx(sa[key], abs=1e-6), (key, what)
    for name, value in sa["per_class_iou"].items():
        assert sb["per_class_iou"][name] == pytest.approx(value, abs=1e-6), (name, what)
    assert [r["epoch"] for r in records(b)] == list(range(1, EPOCHS + 1)), what  # each epoch logged once
    wa, wb = (load_checkpoint(r / "checkpoints" / "last.ckpt")["model"] for r in (a, b))
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa), what


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "group"), [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-group", "sigterm-to-the-main-process"])
def test_signal_at_a_random_moment_stops_cleanly_and_resumes_exactly(tmp_path: Path, straight: Path,
                                                                     sig: signal.Signals, group: bool) -> None:
    run_dir = tmp_path / "run"
    proc = start_cli([*COMMON, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    try:
        wait_until(lambda: len(records(run_dir)) >= 1, proc, 240, "a first validation")
        delay = random.uniform(0.0, 2.0)  # anywhere in the next few steps: training, validation or a save
        time.sleep(delay)
        sent = time.monotonic()
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    what = f"{sig.name} {delay:.2f} s after the first validation"
    assert "Traceback" not in out + err, (what, err[-3000:])
    assert took < 30, (what, took)  # seconds on an idle machine; a busy 2-core one is slower
    if rc == 0:  # the run ended before the signal arrived
        assert summary(run_dir)["status"] == "completed", what
        return
    assert rc == 128 + sig, (what, rc, err[-3000:])
    s = summary(run_dir)
    kept = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["trainer"]["epoch"]
    assert s["status"] == "interrupted" and s["checkpoint_epoch"] == kept >= 1, (what, s)
    assert s["stopped_reason"].startswith(f"interrupted by {sig.name} "), s["stopped_reason"]
    assert f"checkpoints/last.ckpt holds epoch {kept}: continue with trainer.resume=auto" in s["stopped_reason"]
    assert s["stopped_reason"] in (run_dir / "train.log").read_text()
    assert [r["epoch"] for r in records(run_dir)][-1] >= kept

    resumed = run_cli([*COMMON, f"hydra.run.dir={run_dir}", "trainer.resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.ckpt'} at epoch {kept}" in resumed.stdout + resumed.stderr
    assert_same_end(straight, run_dir, what)


@pytest.mark.slow
def test_a_signal_before_training_leaves_nothing_and_says_one_line(tmp_path: Path) -> None:
    """While the store is prepared (before the loop): the same exit status and no traceback; a folder holding
    nothing of the run is removed, as for a refused command."""
    run_dir = tmp_path / "run"
    store = tmp_path / "stores"
    many = [a for a in COMMON if not a.startswith("dataset.layout.num_train=")] + ["dataset.layout.num_train=400"]
    proc = start_cli([*many, f"hydra.run.dir={run_dir}", f"paths.store_dir={store}"], cwd=tmp_path)
    try:
        wait_until(lambda: store.is_dir(), proc, 240, "store preparation")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "stderr.txt").read_text()
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM (outside a training loop")
    assert not (run_dir / "summary.json").exists()


def test_sigterm_raises_interrupted_and_the_handlers_are_put_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err, signals_handled():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert err.value.exit_status == 143 and isinstance(err.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_loader_workers_ignore_the_signals() -> None:
    """A worker that died on Ctrl-C would fail the step the main process is finishing."""
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=None)
    quiet_workers(loader)
    quiet_workers(loader)  # once only
    assert loader.worker_init_fn.args == (None,)
    loader_iter = iter(loader)
    next(loader_iter)
    pids = [w.pid for w in loader_iter._workers]
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert [b.tolist() for b in loader_iter] == [[2, 3], [4, 5], [6, 7]]
