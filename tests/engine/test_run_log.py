"""`<run>/train.log` holds the run: every line the console shows except progress bars (the config, the store, each
epoch's metrics line, warnings, the end and `run_dir:`), once on the console."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from segplat.utils.console import say, warnings_logged
from tests.engine.runs import QUICK, records, run_cli


@pytest.mark.slow
def test_the_log_file_holds_what_the_console_showed(tmp_path: Path) -> None:
    run_dir, store = tmp_path / "run", tmp_path / "stores"
    proc = run_cli([*QUICK, "trainer.max_epochs=2", f"paths.store_dir={store}", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    console = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    epoch_lines = [line for line in console if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and len(records(run_dir)) == 2
    for line in console:  # every console line, in the log (Hydra's prefix added)
        assert line.split("] ", 1)[-1] in log, line
    assert f"train {run_dir}: " in log and "model=unet" in log and "trainer.max_epochs=2" in log  # the config
    assert f"prepared {store}" in log  # the store
    assert "completed: 2/2 epochs, 8 steps; best val/miou " in log  # the end
    assert log.rstrip().endswith(f"run_dir: {run_dir}")
    assert proc.stdout.count("epoch 1/2 |") == 1  # the console shows each line once


def test_say_and_warnings_reach_the_log_file_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "task.log")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        say("epoch 1/1 | a line")
        say("error: one sentence.", err=True)
        with warnings_logged():
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    text = (tmp_path / "task.log").read_text()
    assert text.splitlines()[:2] == ["epoch 1/1 | a line", "error: one sentence."]
    assert "UserWarning: a library's warning" in text
    out, err = capsys.readouterr()
    assert out == "epoch 1/1 | a line\n" and err == "error: one sentence.\n"  # pytest records the warning itself
