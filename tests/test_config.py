"""Every option of every config group composes, and what it describes instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from segplat.config import check_config
from segplat.data.layouts.base import Layout
from segplat.errors import ConfigError
from segplat.models.encoders.gfm.encoders import import_terratorch
from segplat.models.fusion import FusionSpec
from segplat.schema import check_targets
from tests.conftest import CONF_DIR, compose_train

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith(("hydra", "sweep")))
# models whose natural inputs are not RGB + NIR
MODEL_INPUTS = {
    "dualstream": {"image": 4, "air": 48},
    "unet3d": {"s2": 10, "s1": 3},
    "ms2mnet": {"image": 3, "dsm": 1},
}
# geo-foundation models (the gfm extra): their smallest size, built from Sentinel-1/-2 band names
GFM_PRESETS = {"prithvi": "model.encoder.name=prithvi_eo_v2_tiny_tl",
               "terramind": "model.encoder.name=terramind_v1_tiny"}
S1S2_BANDS = {"s2": ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"],
              "s1": ["VV", "VH"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


def test_required_groups_exist():
    required = {"model", "fusion", "dataset", "loss", "optimizer", "scheduler", "trainer", "logger", "callbacks",
                "paths", "experiment", "debug"}
    assert required <= set(GROUPS)


def test_experiment_presets_are_global_packages():
    for f in (CONF_DIR / "experiment").glob("*.yaml"):
        assert f.read_text().lstrip().startswith("# @package _global_"), f"{f} must start with # @package _global_"


def assert_built_as_configured(model, cfg) -> None:
    """The preset builds the class it names, with an encoder and a decoder parameter group of its own (what
    `optimizer.encoder_lr` / `decoder_lr` and `callbacks=finetune` act on)."""
    assert type(model) is get_class(cfg.model._target_)
    groups = model.grouped_parameters()
    assert groups["encoder"] and groups["decoder"], {g: len(v) for g, v in groups.items()}


def _tiny_model(modalities, num_classes, cfg):
    return instantiate(cfg.model, modalities=modalities, num_classes=num_classes)


@pytest.mark.parametrize("group, option", [
    pytest.param(g, o, id=f"{g}={o}", marks=[pytest.mark.slow] if g == "model" and o in GFM_PRESETS else [])
    for g, o in CASES])  # a GFM preset is slow: TerraTorch's import alone takes seconds
def test_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    gfm = group == "model" and option in GFM_PRESETS
    if gfm:
        try:
            import_terratorch()
        except ConfigError:
            pytest.skip('the gfm extra is not installed (pip install -e ".[gfm]")')
    cfg = compose_train([f"{group}={option}", *([GFM_PRESETS[option]] if gfm else [])], output_dir=tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if gfm:
        from segplat.models.build import build_model

        check_config(cfg)
        model = build_model(cfg.model, {"s2": 13, "s1": 2}, 2, S1S2_BANDS)
        assert_built_as_configured(model, cfg)
    elif group == "model":
        check_config(cfg)
        mods = MODEL_INPUTS.get(option, {"rgb": 3, "nir": 1})
        model = _tiny_model(mods, 4, cfg)
        assert_built_as_configured(model, cfg)
    elif group == "dataset":
        dm = instantiate(cfg.dataset)
        assert (dm.patch_size, dm.tile_size) == (cfg.dataset.patch_size, cfg.dataset.tile_size)
        assert dm.patch_size <= dm.tile_size
        layout_cls = get_class(cfg.dataset.layout._target_)
        assert issubclass(layout_cls, Layout)
        check_targets(cfg.dataset, root="dataset")  # the YAML holds only keys the layout takes, each of its type
    elif group in ("loss",):
        loss = instantiate(cfg.loss)
        loss.set_ignore_index(255)
        logits = torch.randn(2, 4, 8, 8, requires_grad=True)
        target = torch.randint(0, 4, (2, 8, 8))
        target[0, 0] = 255
        value, _ = loss({"out": logits}, target)
        assert torch.isfinite(value)
    elif group in ("optimizer", "scheduler"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        opt = instantiate(cfg.optimizer)(model)
        sched = instantiate(cfg.scheduler)(opt, total_steps=10, steps_per_epoch=5)
        sched.step(0.5) if sched.interval == "validation" else sched.step()
        assert all(g["lr"] > 0 for g in opt.param_groups)
    elif group == "trainer":
        trainer = instantiate(cfg.trainer)
        assert trainer.max_epochs == cfg.trainer.max_epochs  # the key takes effect
    elif group == "callbacks":
        for key, node in cfg.callbacks.items():
            if key not in ("monitor", "mode") and node is not None:
                instantiate(node)
    elif group == "fusion":
        # the entry builds a FusionSpec; which models accept it is tests/models/test_fusion_matrix.py's
        spec = instantiate(cfg.fusion)
        assert isinstance(spec, FusionSpec) and (spec.level, spec.type) == (cfg.fusion.level, cfg.fusion.type)
        assert (spec.module is None) == (cfg.fusion.module is None)
    elif group in ("experiment", "debug"):
        check_config(cfg)
    elif group == "logger":  # every entry is a tracker adapter that builds (metrics.jsonl is always among them)
        from segplat.engine.loggers import Tracker
        from segplat.train import build_loggers

        trackers = build_loggers(cfg)  # built, not started: nothing is written
        assert trackers and all(isinstance(t, Tracker) for t in trackers)
        assert option in ("default", "none", "jsonl") or option.split("_")[0] in [t.name for t in trackers]
    elif group == "paths":
        assert cfg.paths.cache_dir


@pytest.mark.parametrize(("override", "key"), [("trainer.overwrite=no", "trainer.overwrite"),
                                               ("trainer.channels_last=yes", "trainer.channels_last"),
                                               ("callbacks.checkpoint.save_best=1", "callbacks.checkpoint.save_best")])
def test_a_word_for_a_true_false_key_is_refused(override: str, key: str) -> None:
    """`trainer.overwrite=no` reaches Python as the text "no", which is true: it cleared the run folder."""
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ must be true or false\.$"):
        check_config(compose_train([override]))
    check_config(compose_train([f"{key}=false"]))


def test_a_missing_required_key_and_a_gpu_that_is_not_there_are_one_sentence(tmp_path: Path) -> None:
    from segplat.predict import choose_device, predict
    from tests.inference.test_predict_streaming import compose_predict

    with pytest.raises(ConfigError, match=r"^ckpt is required: add ckpt=\.\.\. \(a training run folder"):
        predict(compose_predict(["input=x.tif"], tmp_path))
    with pytest.raises(ConfigError, match=r"^tta\.flips=no must be true or false"):
        predict(compose_predict(["ckpt=x.ckpt", "input=x.tif", "tta.flips=no"], tmp_path))
    with pytest.raises(ConfigError, match=r"device=gpu is not known"):
        choose_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device=cuda: this machine has no CUDA GPU"):
            choose_device("cuda")
    assert choose_device("cpu") == "cpu"
