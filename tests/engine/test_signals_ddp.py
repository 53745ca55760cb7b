"""A signal under torchrun (2 gloo processes on CPU): SIGINT reaching one rank only stops every rank at the same
step (they agree in the step's collective: a rank that went on alone would wait in the next one until the timeout),
rank 0 writes summary.json `interrupted`, and `trainer.resume=auto` ends where an uninterrupted run does."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.launch_utils import BASE, env_for, metrics, run, summary, torchrun_cmd
from tests.engine.runs import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EPOCHS = 20  # tiny epochs take a fraction of a second: enough of them that the signal lands mid-run


def rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (a child of the agent, RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == agent and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def test_a_signal_to_one_rank_stops_all_ranks_together_and_resumes_exactly(tmp_path: Path) -> None:
    common = [*BASE, f"trainer.max_epochs={EPOCHS}", "callbacks.early_stopping=null", "callbacks.visuals=null",
              "callbacks.report=null", "trainer.dist_timeout=60"]
    env = env_for(tmp_path / "logs")
    runs = tmp_path / "logs" / "train" / "runs"
    straight = run(torchrun_cmd([*common, "run_name=straight"], nproc=2), env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = runs / "cut"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(torchrun_cmd([*common, "run_name=cut"], nproc=2), env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and metrics(run_dir), proc, 240, "a validation")
        time.sleep(delay := random.uniform(0.0, 0.5))
        pid = rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        sent = time.monotonic()
        os.kill(pid, signal.SIGINT)
        proc.wait(timeout=90)  # a rank that did not agree would wait dist_timeout (60 s) and then fail
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "stderr.txt").read_text()
    what = f"SIGINT to rank 1 {delay:.2f} s after the first validation ({took:.1f} s to stop)"
    s = summary(run_dir)
    assert s["status"] != "completed", f"the run ended before the {what}; raise EPOCHS"
    assert took < 30, what
    assert s["status"] == "interrupted", (what, s, err[-3000:])
    # rank 0 stopped for rank 1's SIGINT (agreed in the step's collective), not for the SIGTERM torchrun sends the
    # other ranks once one has ended
    assert s["stopped_reason"].startswith("interrupted by SIGINT "), s["stopped_reason"]
    assert "exitcode  : 130" in err, err[-3000:]  # rank 1, as torchrun reports it
    assert "/segplat/" not in err, err[-3000:]  # no rank printed a traceback (torchrun prints its own)

    resumed = run(torchrun_cmd([*common, "run_name=cut", "trainer.resume=auto"], nproc=2), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = summary(runs / "straight"), summary(run_dir)
    assert b["status"] == "completed" and b["epochs_completed"] == EPOCHS and b["global_step"] == a["global_step"]
    assert [r["epoch"] for r in metrics(run_dir)] == list(range(1, EPOCHS + 1)), what
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6) and b["miou"] == pytest.approx(a["miou"], abs=1e-6)
