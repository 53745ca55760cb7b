"""A refused command line gets Hydra's message plus one `error:` line with the nearest valid option or key."""

from __future__ import annotations

import pytest

from segplat.utils.task import config_error_hint, overrides_of


@pytest.mark.parametrize("argv, hint", [
    (["trainer.max_epoch=3"], "trainer.max_epoch is not a key of trainer; did you mean trainer.max_epochs?"),
    (["trainr.max_epochs=3"], "trainr.max_epochs is not a key of the config; did you mean trainer.max_epochs?"),
    (["model=unett"], "model=unett is not an option of model (conf/model/); did you mean model=unet?"),
    (["logger=[jsonl,mlfow]"], "logger=mlfow is not an option of logger (conf/logger/); did you mean logger=mlflow?"),
    (["model=cmx", "model.backbon=mit_b0"], "model.backbon is not a key of model; did you mean model.backbone?"),
    (["optimizer=adamw", "--cfg", "job", "trainer.max_epoch=1"], "did you mean trainer.max_epochs?"),
    (["logger.mlflow.tracking_uri=http://h:5000"], "mlflow is an option of logger that this run does not select; "
                                                   "select it with logger=mlflow"),
    # a nested group is chosen through its parent's presets (it advised loss/terms=ohem, itself refused)
    (["loss.terms.ohem.thres=0.5"], "ohem is not part of this run's loss; select it with loss=ohem or loss=ohem_dice"),
    # a key under a value (null here) is not a typo of that value (it suggested the same key again)
    (["dataset.photometric.foo=1"], "dataset.photometric is null here, not a section with keys"),
    # sweep has a place in the defaults (so that debug=fast applies to trials): the old +sweep= is explained
    (["+sweep=fusion_patch_lr"], "sweep already has a place in the config's defaults, so it is chosen without a +: "
                                 "write sweep=NAME, not +sweep=NAME."),
    # the sampler is a config group (as in hydra-optuna-sweeper), no longer a `name` key
    (["-m", "hydra.sweeper.sampler.name=random"], "hydra.sweeper.sampler.name is not a key: hydra.sweeper.sampler is "
                                                  "a config group, chosen with hydra/sweeper/sampler=random."),
    (["-m", "hydra.sweeper.sampler.name=nsga2"], "chosen with hydra/sweeper/sampler=NAME; did you mean "
                                                 "hydra/sweeper/sampler=nsgaii?"),
    (["-m", "hydra.sweeper.sampler.name=xyz"], "chosen with hydra/sweeper/sampler=NAME; use cmaes, gp, grid, "
                                                 "nsgaii, qmc, random or tpe."),
])
def test_near_misses_get_a_suggestion(argv, hint):
    assert hint in config_error_hint("train", argv)


def test_no_hint_when_the_command_line_composes():
    assert config_error_hint("train", ["trainer.max_epochs=3", "logger=[jsonl,mlflow]"]) is None
    assert overrides_of(["-m", "--config-name", "other", "a=1"]) is None  # another primary config: not ours to explain


def test_debug_shortens_a_sweeps_trials():
    """+sweep= was composed after debug, so debug=fast trials trained the sweep's 8 epochs."""
    from segplat.utils.task import compose_config

    assert compose_config("train", ["sweep=fusion_patch_lr"]).trainer.max_epochs == 8
    assert compose_config("train", ["sweep=fusion_patch_lr", "debug=fast"]).trainer.max_epochs == 1
    assert compose_config("train", ["sweep=fusion_patch_lr", "debug=fast", "trainer.max_epochs=2"]
                          ).trainer.max_epochs == 2  # the command line still decides last


@pytest.mark.slow
def test_a_sweep_without_multirun_is_refused(tmp_path):
    """It trained one run with the sweep file's fixed settings and searched nothing, without a word."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "segplat.train", "sweep=fusion_patch_lr", "debug=fast",
                          f"paths.log_dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "error: sweep=fusion_patch_lr is a search space: run it with --multirun" in res.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
