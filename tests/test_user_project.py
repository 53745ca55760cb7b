"""A user's project (tests/user_project: the package `tinyproj` and its `conf/`) through every task, joined to segplat
by the one documented mechanism, `hydra.searchpath` (docs/user-project.md): train, resume, a --multirun sweep,
predict, evaluate, the model summary, `segplat.create_model` and `segplat.load_model`. The project is copied into
an empty folder and run from there, as a user runs it; its package is found through PYTHONPATH, as after
`pip install -e .`."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import segplat
from segplat.config import check_config
from segplat.errors import CheckpointError, ConfigError
from segplat.utils.task import compose_config, config_error_hint
from tests.conftest import REPO
from tests.user_project import SEARCHPATH, USER_CONF, USER_PROJECT, on_path, subprocess_env

RELATIVE = "hydra.searchpath=[file://conf]"  # as the docs write it: relative to where the command runs
QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
         "callbacks.visuals=null"]


def test_the_users_configs_compose_and_pass_segplats_checks(monkeypatch):
    on_path(monkeypatch)
    cfg = compose_config("train", [SEARCHPATH, "experiment=tiny_baseline", "fusion=early"])
    check_config(cfg)
    assert cfg.model._target_ == "tinyproj.model.TinyNet"
    assert cfg.dataset.layout._target_ == "tinyproj.layout.TinyLayout"
    assert set(cfg.loss.terms) == {"ce", "soft_jaccard"} and set(cfg.logger) == {"jsonl", "tinycsv"}


@pytest.mark.parametrize("override, message", [
    ("model.width=0", r"^model\.width=0 must be a positive integer\."),
    ("+model.widht=4", r"^model\.widht is not a key of model; did you mean model\.width\?"),
    ("loss.terms.soft_jaccard.smooth=-1", r"^loss\.terms\.soft_jaccard\.smooth=-1(\.0)? must be a positive number"),
    ("+dataset.layout.elevation_nodta=0", r"^dataset\.layout\.elevation_nodta is not a key of dataset\.layout; did "),
    ("+logger.tinycsv.file=x.csv", r"^logger\.tinycsv\.file is not a key of logger\.tinycsv; did you mean "),
])
def test_the_users_targets_are_checked_like_segplats(override, message, monkeypatch):
    """The schema walker reads the user's signatures and hints too (segplat.schema aliases in tinyproj)."""
    on_path(monkeypatch)
    cfg = compose_config("train", [SEARCHPATH, "experiment=tiny_baseline", override])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_the_users_fusion_module_plugs_into_segplats_models(monkeypatch):
    on_path(monkeypatch)
    model = segplat.create_model("unet", {"image": 3, "elevation": 1}, 3, fusion="mid_tinymax", searchpath=[USER_CONF],
                                 encoder={"name": "resnet10t"}, decoder={"channels": [8, 8, 8, 8]})
    assert {type(f).__name__ for f in model.fusion.values()} == {"MaxFusion"}
    out = model({"image": torch.randn(2, 3, 64, 64), "elevation": torch.randn(2, 1, 64, 64)})["out"]
    out.mean().backward()
    assert out.shape == (2, 3, 64, 64)
    assert all(p.grad is not None for f in model.fusion.values() for p in f.parameters())


def test_a_plain_user_model_refuses_a_fusion_it_would_ignore(monkeypatch):
    on_path(monkeypatch)
    with pytest.raises(ConfigError, match=r"model tinyproj\.model\.TinyNet takes no model\.fusion"):
        segplat.create_model("tiny", {"image": 3, "elevation": 1}, 3, fusion="mid", searchpath=[USER_CONF])


def test_a_user_config_with_the_name_of_segplats_own_is_refused(tmp_path, monkeypatch):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "unet.yaml").write_text("_target_: tinyproj.model.TinyNet\n")
    with pytest.raises(ConfigError, match=r"conf/model/unet\.yaml has the name of segplat's own model/unet\.yaml, "
                                          r"which Hydra reads instead, so yours would never be used; rename it"):
        segplat.create_model("unet", {"rgb": 3}, 2, searchpath=[tmp_path / "conf"])


def test_a_config_folder_that_is_not_there_is_named_on_the_command_line(tmp_path, monkeypatch):
    """Hydra itself skips a search-path folder that does not exist; segplat names it instead of 'no option tiny'."""
    monkeypatch.chdir(tmp_path)
    hint = config_error_hint("train", ["hydra.searchpath=[file://conf]", "model=tiny"])
    assert hint == (f"hydra.searchpath entry file://conf names {tmp_path}/conf, which is not a folder; give the folder "
                    "that holds your model/, dataset/, ... config groups (see docs/user-project.md).")
    assert config_error_hint("train", [SEARCHPATH, "model=tiny"]) is None


# -- end to end, from an empty folder ---------------------------------------------------------------------------
def run(args: list[str], cwd: Path, env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def run_dir(proc: subprocess.CompletedProcess) -> Path:
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The user's project copied into an empty folder, with a small copy of its data."""
    root = tmp_path_factory.mktemp("myproject")
    shutil.copytree(USER_PROJECT / "conf", root / "conf")
    shutil.copytree(USER_PROJECT / "tinyproj", root / "tinyproj", ignore=shutil.ignore_patterns("__pycache__"))
    env = subprocess_env(REPO, root, SEGPLAT_CACHE=str(root / ".cache"), TINYPROJ_DATA=str(root / "data"))
    run(["-c", "from tinyproj.layout import write_fake; write_fake('data')"], root, env)
    return root, env


@pytest.fixture(scope="module")
def trained(project) -> Path:
    root, env = project
    proc = run(["-m", "segplat.train", RELATIVE, "experiment=tiny_baseline", "run_name=a", *QUICK], root, env)
    return run_dir(proc)


@pytest.mark.slow
def test_train_and_resume_with_the_users_model_layout_loss_and_tracker(project, trained):
    root, env = project
    assert (trained / "checkpoints" / "best.ckpt").is_file()
    config = (trained / "config.yaml").read_text()
    assert "tinyproj.model.TinyNet" in config and "tinyproj.losses.SoftJaccard" in config
    rows = list(csv.DictReader((trained / "tracked.csv").open()))
    assert [r["epoch"] for r in rows] == ["1.0"] and (trained / "tracked.status").read_text() == "completed"
    proc = run(["-m", "segplat.train", RELATIVE, "experiment=tiny_baseline", "run_name=a", "trainer.resume=auto",
                *QUICK, "trainer.max_epochs=2"], root, env)
    assert "resumed from" in proc.stderr + proc.stdout
    rows = list(csv.DictReader((trained / "tracked.csv").open()))
    assert [r["epoch"] for r in rows] == ["1.0", "2.0"]  # the user's tracker carried on in the same run
    assert int(rows[1]["step"]) > int(rows[0]["step"])


@pytest.mark.slow
def test_predict_and_evaluate_need_the_users_configs(project, trained):
    root, env = project
    args = ["-m", "segplat.predict", f"ckpt={trained}", "input=data", "split=val"]
    refused = run(args, root, env, expect=2)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tinyproj.model.TinyNet" in errors[0] and "hydra.searchpath=[file://DIR]" in errors[0]
    assert "Traceback" not in refused.stderr
    missing = run([*args, "hydra.searchpath=[file://nowhere]"], root, env, expect=2)
    assert missing.stderr.strip().splitlines()[-1].startswith("error: hydra.searchpath entry file://nowhere names ")
    out = run_dir(run([*args, RELATIVE], root, env))
    assert sorted(p.name for p in out.glob("*.tif")) == ["s00_classes.tif", "s01_classes.tif"]
    evaluated = run_dir(run(["-m", "segplat.evaluate", RELATIVE, f"ckpt={trained}", "split=val"], root, env))
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics["per_class_iou"]) == {"ground", "roof", "tree"}


@pytest.mark.slow
def test_a_sweep_of_the_users_search_space(project):
    root, env = project
    proc = run(["-m", "segplat.train", "--multirun", RELATIVE, "experiment=tiny_baseline", "sweep=tiny_lr", *QUICK],
               root, env)
    sweep = root / "logs" / "train" / "sweeps" / "tiny_lr"
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["counts"] == {"COMPLETE": 2}, proc.stderr[-3000:]
    assert summary["best_trials"][0]["params"]["model.width"] in (4, 8)
    trials = list(csv.DictReader((sweep / "trials.csv").open()))
    configs = [(sweep / f"trial_{int(t['number']):04d}" / "config.yaml").read_text() for t in trials]
    assert len(configs) == 2 and all("tinyproj.model.TinyNet" in c for c in configs)
    # each trial trained the width it was given (the user's key took effect)
    for t, config in zip(trials, configs):
        assert f"width: {int(float(t['params_model.width']))}" in config


@pytest.mark.slow
def test_the_model_summary_of_the_users_model(project):
    root, env = project
    proc = run(["-m", "segplat.models.summary", RELATIVE, "model=tiny", "dataset=tinydata", "input_size=32"], root, env)
    assert "model: tinyproj.model.TinyNet" in proc.stdout and "outputs: {out: (1, 3, 32, 32)}" in proc.stdout
    assert "encoder " in proc.stdout and "  head " in proc.stdout


@pytest.mark.slow
def test_load_model_and_create_model_with_the_users_configs(project, trained, monkeypatch):
    root, _ = project
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(CheckpointError, match=r"tinyproj\.model\.TinyNet.*searchpath=\[DIR\] for segplat\.load_model"):
        segplat.load_model(trained)
    loaded = segplat.load_model(trained, searchpath=["conf"])
    assert loaded.classes == ["ground", "roof", "tree"] and list(loaded.specs) == ["image", "elevation"]
    scene = {"image": torch.randint(0, 3000, (1, 3, 32, 32)).float(), "elevation": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        assert loaded.model(loaded.preprocessor(scene))["out"].shape == (1, 3, 32, 32)
    fresh = segplat.create_model("tiny", {"image": 3, "elevation": 1}, 3, searchpath=["conf"], width=8)
    assert [k.removeprefix("net.") for k in fresh.state_dict()] == [k.removeprefix("net.")
                                                                   for k in loaded.model.state_dict()]
