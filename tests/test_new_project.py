"""`python -m segplat.new project DIR`: a new user's skeleton (package, model, dataset on their GeoTIFFs, experiment,
sweep, test) that trains at once and whose own test passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segplat.config import CONF_DIR
from segplat.errors import ConfigError
from segplat.new import create_project, main
from tests.conftest import REPO
from tests.user_project import subprocess_env


def test_the_skeleton_holds_a_package_configs_and_a_test(tmp_path, capsys):
    assert main(["project", str(tmp_path / "My-Floods")]) == 0
    root = tmp_path / "My-Floods"
    assert "wrote a segplat project" in capsys.readouterr().out
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "README.md", "conf/dataset/my_floods.yaml", "conf/experiment/my_floods_baseline.yaml",
        "conf/model/my_floods_net.yaml", "conf/sweep/my_floods_search.yaml", "my_floods/__init__.py",
        "my_floods/model.py", "pyproject.toml", "tests/test_my_floods.py"]
    model = yaml.safe_load((root / "conf/model/my_floods_net.yaml").read_text())
    assert model == {"_target_": "my_floods.model.MyFloodsNet", "width": 32, "depth": 3}
    # the dataset config is segplat's generic geotiff one, every key listed, with the project's name and data folder
    ours = yaml.safe_load((root / "conf/dataset/my_floods.yaml").read_text())
    shipped = yaml.safe_load((CONF_DIR / "dataset/geotiff.yaml").read_text())
    assert ours == {**shipped, "name": "my_floods", "root": "data"}
    for file in root.rglob("*.py"):
        compile(file.read_text(), str(file), "exec")


@pytest.mark.parametrize("make, package, message", [
    (lambda d: (d.mkdir(), (d / "x.txt").write_text("mine")), None, r"already exists and is not an empty folder"),
    (lambda d: None, "my-pkg", r"--package 'my-pkg' is not a Python identifier"),
    (lambda d: None, "json", r"--package json: a module of that name is already importable"),
    (lambda d: None, "clouds", r"--package clouds: segplat already ships dataset/clouds"),
])
def test_the_generator_refuses_what_would_break_or_overwrite(tmp_path, make, package, message):
    folder = tmp_path / "proj"
    make(folder)
    with pytest.raises(ConfigError, match=message):
        create_project(folder, package)
    if package is not None:
        assert not folder.exists()
    else:
        assert [p.name for p in folder.iterdir()] == ["x.txt"]


def test_the_cli_refuses_in_one_line(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "a").write_text("")
    assert main(["project", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
def test_a_generated_project_trains_predicts_and_its_test_passes(tmp_path):
    root = create_project(tmp_path / "newproj")
    env = subprocess_env(REPO, root, SEGPLAT_CACHE=str(tmp_path / "cache"))

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    run("-m", "segplat.data.fake", "geotiff", "data")  # the README's first step: a small copy of GeoTIFFs
    tests = run("-m", "pytest", "-q", "-p", "no:cacheprovider")
    assert "2 passed" in tests.stdout
    searchpath = "hydra.searchpath=[file://conf]"
    trained = run("-m", "segplat.train", searchpath, "experiment=newproj_baseline", "debug=fast", "run_name=first")
    run_dir = Path(trained.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))
    assert run_dir == root / "logs" / "train" / "runs" / "first" and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert "newproj.model.NewprojNet" in (run_dir / "config.yaml").read_text()
    predicted = run("-m", "segplat.predict", searchpath, f"ckpt={run_dir}", "input=data", "split=val", "limit=1")
    out = Path(predicted.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))
    assert len(list(out.glob("*.tif"))) >= 1
