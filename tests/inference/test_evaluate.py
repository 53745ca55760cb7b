"""The evaluate task: metrics equal the trainer's validation; the ISPRS protocol leaves clutter out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from segplat.errors import ConfigError, DataError
from segplat.evaluate import evaluate
from segplat.train import train
from tests.conftest import TINY, compose_train


def compose_eval(overrides: list[str], output_dir: Path):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.mark.slow
def test_evaluate_reproduces_the_validation_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_train([*TINY, "trainer.max_epochs=1"], output_dir=run))
    out = tmp_path / "eval"
    score = evaluate(compose_eval([f"ckpt={run}", "split=val", "progress=false"], out))
    summary = json.loads((run / "summary.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(summary["miou"], abs=1e-6) == pytest.approx(score, abs=1e-6)
    assert metrics["per_class_iou"] == pytest.approx(summary["per_class_iou"], abs=1e-6)
    with open(out / "confusion_matrix.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == summary["classes"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == summary["confusion_matrix"]
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="protocol=isprs needs an ISPRS dataset"):
        evaluate(compose_eval([f"ckpt={run}", "protocol=isprs"], tmp_path / "e2"))
    with pytest.raises(ConfigError, match="exclude_classes"):
        evaluate(compose_eval([f"ckpt={run}", "exclude_classes=[fog]"], tmp_path / "e3"))


@pytest.mark.slow
def test_isprs_protocol_uses_eroded_labels_and_leaves_clutter_out(tmp_path: Path, capsys) -> None:
    from segplat.data.fake import write_fake

    root = tmp_path / "vaihingen"
    write_fake("vaihingen", root)
    run = tmp_path / "run"
    small = [o for o in TINY if not o.startswith("dataset.layout")]
    train(compose_train(["dataset=vaihingen", f"dataset.root={root}", *small, "trainer.max_epochs=1"], output_dir=run))
    evaluate(compose_eval([f"ckpt={run}", f"dataset.root={root}", "progress=false"], tmp_path / "std"))
    capsys.readouterr()
    score = evaluate(compose_eval([f"ckpt={run}", f"dataset.root={root}", "protocol=isprs", "progress=false"],
                                  tmp_path / "isprs"))
    printed = capsys.readouterr().out.splitlines()[0]
    standard = json.loads((tmp_path / "std" / "metrics.json").read_text())
    isprs = json.loads((tmp_path / "isprs" / "metrics.json").read_text())
    assert "excluding" not in standard
    assert isprs["excluding"]["classes_left_out"] == ["clutter"]
    assert "clutter" not in isprs["excluding"]["classes"] and len(isprs["excluding"]["classes"]) == 5
    # the protocol's figure is the one shown first, returned, and read as headline_miou
    assert isprs["headline_miou"] == isprs["excluding"]["miou"] == pytest.approx(score)
    assert printed.startswith(f"mIoU without clutter {score:.4f} |") and "all classes: mIoU" in printed
    assert standard["headline_miou"] == standard["miou"]

    def labelled_pixels(folder: Path) -> int:
        with open(folder / "confusion_matrix.csv") as fh:
            return sum(int(v) for row in list(csv.reader(fh))[1:] for v in row[1:])

    # the eroded labels ignore the class boundaries: fewer pixels count
    assert 0 < labelled_pixels(tmp_path / "isprs") < labelled_pixels(tmp_path / "std")


@pytest.mark.slow
def test_a_split_without_labels_is_refused_not_scored_nan(tmp_path: Path) -> None:
    from segplat.data.fake import write_fake

    root = tmp_path / "clouds"
    write_fake("clouds", root)
    run = tmp_path / "run"
    small = [o for o in TINY if not o.startswith("dataset.layout")]
    train(compose_train(["dataset=clouds", f"dataset.root={root}", *small, "trainer.max_epochs=1"], output_dir=run))
    out = tmp_path / "test"
    with pytest.raises(DataError, match=r"split test of clouds has no labelled pixels .* e\.g\. split=val\.$"):
        evaluate(compose_eval([f"ckpt={run}", f"dataset.root={root}", "split=test", "progress=false"], out))
    assert not (out / "metrics.json").exists()
