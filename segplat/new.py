"""`python -m segplat.new project DIR` (or `segplat-new project DIR`): a new user project that trains at once.

A project is your own package and your own config folder, joined to segplat by Hydra's search path
(`hydra.searchpath=[file://conf]`, docs/user-project.md); segplat stays installed, never forked. The skeleton:

    DIR/pyproject.toml              your package (pip install -e . makes it importable for every task)
    DIR/README.md                   the commands below, for this project
    DIR/<pkg>/model.py              a plain nn.Module under segplat's model contract
    DIR/conf/model/<pkg>_net.yaml   selects it: model=<pkg>_net
    DIR/conf/dataset/<pkg>.yaml     your GeoTIFFs under DIR/data (segplat's generic geotiff layout, every key listed)
    DIR/conf/experiment/<pkg>_baseline.yaml, DIR/conf/sweep/<pkg>_search.yaml
    DIR/tests/test_<pkg>.py         the model keeps the contract and the experiment composes and passes the checks

`--package NAME` names the package (default: DIR's name, made a Python identifier). Nothing is overwritten.
"""

from __future__ import annotations

import argparse
import importlib.util
import keyword
import re
import sys
from pathlib import Path

from segplat.config import CONF_DIR
from segplat.errors import ConfigError
from segplat.utils.io import atomic_write_text

MODEL = '''"""{cls}: your model. Edit it freely; segplat needs only its contract (docs/user-project.md in segplat):

- the constructor takes `modalities` (name -> input channels, in the dataset's order) and `num_classes`, and any
  keys of its own (typed with segplat.schema's aliases, so a wrong value is refused before data);
- `forward(inputs)` takes a dict of (B, C, H, W) tensors, one per modality, and returns logits
  (B, num_classes, H, W) at the first modality's size (or {{"out": logits}});
- parameters under `encoder` form the encoder group (optimizer.encoder_lr), everything else the decoder group.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from segplat.schema import PositiveInt


def block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class {cls}(nn.Module):
    """Every modality stacked (early fusion), `depth` stride-2 blocks of `width` channels, a 1x1 head, upsampled."""

    def __init__(self, modalities: dict[str, int], num_classes: int, width: PositiveInt = 32,
                 depth: PositiveInt = 3) -> None:
        super().__init__()
        self.names = list(modalities)
        channels = sum(modalities.values())
        self.encoder = nn.Sequential(block(channels, width, 1),
                                     *[block(width, width, 2) for _ in range(depth)])
        self.head = nn.Sequential(block(width, width, 1), nn.Conv2d(width, num_classes, 1))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([inputs[m] for m in self.names], dim=1)
        logits = self.head(self.encoder(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
'''

MODEL_CONF = """# Your model ({pkg}/model.py): model={pkg}_net. Its keys are its constructor's (typos are refused).
_target_: {pkg}.model.{cls}
width: 32
depth: 3
"""

EXPERIMENT = """# @package _global_
# Your model on your data: segplat-train 'hydra.searchpath=[file://conf]' experiment={pkg}_baseline
defaults:
  - override /dataset: {pkg}
  - override /model: {pkg}_net
trainer:
  max_epochs: 20
optimizer:
  lr: 2.0e-3
tags: [{pkg}]
"""

SWEEP = """# @package _global_
# segplat-train --multirun 'hydra.searchpath=[file://conf]' experiment={pkg}_baseline sweep={pkg}_search
# (the syntax of params: segplat's conf/sweep/fusion_patch_lr.yaml)
defaults:
  - override /hydra/sweeper: segplat_optuna
  - override /hydra/sweeper/sampler: tpe   # tpe | random | gp | cmaes | grid | nsgaii | qmc
trainer:
  max_epochs: 8
callbacks:
  early_stopping: null
hydra:
  sweep:
    dir: ${{paths.log_dir}}/${{task_name}}/sweeps/${{hydra.sweeper.study_name}}
    subdir: ""
  sweeper:
    study_name: {pkg}_search
    n_trials: 12
    sampler:
      seed: 0
    pruner:
      name: median
      n_startup_trials: 3
      n_warmup_steps: 2
    params:
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
      model.width: choice(16, 32, 64)
"""

TEST = '''"""{pkg} keeps segplat's contracts: run with `python -m pytest` in the project folder."""

from __future__ import annotations

from pathlib import Path

import torch

import segplat
from segplat.config import check_config
from segplat.utils.task import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_the_model_gives_logits_at_the_input_size():
    model = segplat.create_model("{pkg}_net", modalities={{"optical": 4, "sar": 2}}, num_classes=3, searchpath=[CONF])
    inputs = {{"optical": torch.randn(2, 4, 64, 48), "sar": torch.randn(2, 2, 64, 48)}}
    out = model(inputs)["out"]
    assert out.shape == (2, 3, 64, 48)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_experiment_composes_and_passes_segplats_checks():
    cfg = compose_config("train", [f"hydra.searchpath=[file://{{CONF}}]", "experiment={pkg}_baseline"])
    check_config(cfg)  # every key of every _target_ against its signature, the fusion, positive sizes
    assert cfg.model._target_ == "{pkg}.model.{cls}"
    assert cfg.dataset.name == "{pkg}"
'''

PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{pkg}"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["segplat"]

[tool.setuptools.packages.find]
include = ["{pkg}*"]

[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["."]
"""

README = """# {pkg}

A segplat project: your code in `{pkg}/`, your configs in `conf/`, segplat installed (never copied). Every task
reads your configs when given `'hydra.searchpath=[file://conf]'` (run from this folder; quote it for zsh).

```bash
pip install -e .                              # once: {pkg} importable by every task and sweep trial
python -m segplat.data.fake geotiff data      # or put your GeoTIFFs under data/ (conf/dataset/{pkg}.yaml says how)
python -m pytest                              # the contract tests in tests/
segplat-train 'hydra.searchpath=[file://conf]' experiment={pkg}_baseline run_name=first
segplat-train 'hydra.searchpath=[file://conf]' experiment={pkg}_baseline run_name=first trainer.resume=auto
segplat-train --multirun 'hydra.searchpath=[file://conf]' experiment={pkg}_baseline sweep={pkg}_search
segplat-predict 'hydra.searchpath=[file://conf]' ckpt=logs/train/runs/first input=data split=val
segplat-evaluate 'hydra.searchpath=[file://conf]' ckpt=logs/train/runs/first split=val
python -m segplat.models.summary 'hydra.searchpath=[file://conf]' model={pkg}_net dataset={pkg}
```

Prediction and evaluation build only models and datasets that configs on this machine name: without
`hydra.searchpath` they refuse a checkpoint of `{pkg}.model.{cls}`. In Python:
`segplat.load_model("logs/train/runs/first", searchpath=["conf"])`,
`segplat.create_model("{pkg}_net", modalities={{"optical": 4, "sar": 2}}, num_classes=3, searchpath=["conf"])`.
"""


def package_name(folder: Path, given: str | None) -> str:
    """`given`, or the folder's name as a lower-case identifier; refused if it is not one or is taken."""
    name = given if given is not None else re.sub(r"\W+", "_", folder.name.lower()).strip("_")
    if name and name[0].isdigit():
        name = f"p{name}"
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(f"--package {name!r} is not a Python identifier; give --package NAME (letters, digits, _).")
    if importlib.util.find_spec(name) is not None:
        raise ConfigError(f"--package {name}: a module of that name is already importable, which yours would "
                          "shadow or be shadowed by; give another --package NAME.")
    taken = [f"{group}/{stem}" for group, stem in (("model", f"{name}_net"), ("dataset", name),
                                                   ("experiment", f"{name}_baseline"), ("sweep", f"{name}_search"))
             if (CONF_DIR / group / f"{stem}.yaml").is_file()]
    if taken:
        raise ConfigError(f"--package {name}: segplat already ships {', '.join(taken)}, which Hydra would read "
                          "instead of yours; give another --package NAME.")
    return name


def dataset_config(pkg: str) -> str:
    """segplat's generic GeoTIFF dataset config with this project's name and data folder (every key listed)."""
    text = (CONF_DIR / "dataset" / "geotiff.yaml").read_text()
    body = text[text.index("_target_:"):]
    for old, new in (("\nname: geotiff\n", f"\nname: {pkg}\n"), ("\nroot: null\n", "\nroot: data\n")):
        if old not in body:
            raise RuntimeError(f"segplat's dataset/geotiff.yaml has no {old.strip()!r} line to adapt")
        body = body.replace(old, new, 1)
    header = (f"# Your GeoTIFFs: dataset={pkg}. segplat's generic geotiff layout (segplat/conf/dataset/geotiff.yaml, "
              "where\n# every key is explained): per-modality globs under `root` (relative to where you run), band "
              "names,\n# a label glob and the class table. As written it reads what `python -m segplat.data.fake "
              "geotiff data`\n# writes; change the globs, bands and classes to your files.\n")
    return header + body


def create_project(folder: str | Path, package: str | None = None) -> Path:
    """Write the skeleton into `folder` (new or empty); returns the folder."""
    out = Path(folder).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder; give a new folder (nothing is "
                          "overwritten).")
    pkg = package_name(out, package)
    cls = "".join(part.capitalize() for part in pkg.split("_") if part) + "Net"
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{pkg}/__init__.py": '"""{pkg}: your models (and layouts, loss terms, trackers) for segplat."""\n',
        f"{pkg}/model.py": MODEL,
        f"conf/model/{pkg}_net.yaml": MODEL_CONF,
        f"conf/experiment/{pkg}_baseline.yaml": EXPERIMENT,
        f"conf/sweep/{pkg}_search.yaml": SWEEP,
        f"tests/test_{pkg}.py": TEST,
    }
    for rel, template in files.items():
        atomic_write_text(out / rel, template.format(pkg=pkg, cls=cls))
    atomic_write_text(out / "conf" / "dataset" / f"{pkg}.yaml", dataset_config(pkg))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segplat.new", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    project = sub.add_parser("project", help="a project folder: your package, conf/, a test")
    project.add_argument("folder", help="the new project's folder (created; must be new or empty)")
    project.add_argument("--package", default=None, help="the package's name (default: the folder's name)")
    args = parser.parse_args(argv)
    try:
        out = create_project(args.folder, args.package)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a segplat project to {out}; next: cd {out} && pip install -e . && python -m pytest "
          "(README.md lists every command)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
