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
])
def test_near_misses_get_a_suggestion(argv, hint):
    assert hint in config_error_hint("train", argv)


def test_no_hint_when_the_command_line_composes():
    assert config_error_hint("train", ["trainer.max_epochs=3", "logger=[jsonl,mlflow]"]) is None
    assert overrides_of(["-m", "--config-name", "other", "a=1"]) is None  # another primary config: not ours to explain
