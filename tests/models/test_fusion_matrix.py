"""Every model preset x every fusion option, and fusion keys drawn at random: built as named, or refused.

A pair either passes `check_config` and builds a model whose fusion modules (type, count, stages; read
from the built modules) are the ones the config names, or is refused by `check_config` in one sentence
naming the key, the model and what it accepts, and by the model itself when built anyway. No fusion key
is ever silently ignored.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from segplat.config import check_config
from segplat.errors import ConfigError
from segplat.models.fusion import resolve_fusion
from tests.conftest import CONF_DIR, compose_train
from tests.models.fusion_helpers import (
    FUSION_OPTIONS,
    GFM_PRESETS,
    MODEL_PRESETS,
    TINY,
    built_fusion,
    named_fusion,
    pyramid_depth,
    stream_encoders,
    tiny_build,
    tiny_overrides,
)

# which fusion entries each preset builds (it refuses every other one), as rules, so that a new entry is
# covered without editing this file: presets with a fixed fusion take their own entry only; the others take
# early/concat, and any entry with a stage module at the levels where they build stage modules
OWN_ENTRY = {"cmx": "frm_ffm", "dualstream": "film_cross_attention", "ms2mnet": "wase_vfe"}
STAGE_MODULE_LEVELS = {"unet": {"mid"}, "deeplabv3plus": {"mid"}, "unet3d": {"mid", "late"}, "segformer": set(),
                       "prithvi": {"mid"}, "terramind": {"mid"}}
PAIRS = [(m, f) for m in MODEL_PRESETS for f in FUSION_OPTIONS]


def accepts(preset: str, option: str) -> bool:
    entry = OmegaConf.load(CONF_DIR / "fusion" / f"{option}.yaml")
    if preset in OWN_ENTRY:
        return option == OWN_ENTRY[preset]
    if entry.level == "early":
        return entry.type == "concat"
    if entry.module is None or preset == "segformer":
        return False
    return entry.level in STAGE_MODULE_LEVELS[preset] or entry.type == "concat"  # concat at late: Segmenter too


def config_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind an exception (Hydra's instantiate wraps what the target raises)."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err


def build(cfg: DictConfig, preset: str):
    # not importorskip: a bare `import terratorch` switches fp32 matmuls to bf16 (see import_terratorch)
    if preset in GFM_PRESETS and importlib.util.find_spec("terratorch") is None:
        pytest.skip('the gfm extra is not installed (pip install -e ".[gfm]")')
    return tiny_build(cfg, preset)


def assert_built_as_named(cfg: DictConfig, model) -> None:
    depth = pyramid_depth(model)
    static = type(model).fusion_stage_count(cfg.model)
    assert static in (None, depth), f"check_config counts {static} stages, the built model has {depth}"
    assert built_fusion(model) == named_fusion(cfg, model, depth)
    assert stream_encoders(model) == (1 if cfg.fusion.level == "early" else len(model.modalities))


def assert_refused(cfg: DictConfig, preset: str) -> str:
    """Refused by check_config in one sentence, and by the model when built anyway; returns the sentence.

    The sentence starts with the fusion key; it names the model unless the fusion entry is wrong whatever the
    model (a type that does not match its module, stages at early fusion, ...).
    """
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("fusion"), message
    try:
        resolve_fusion(cfg.fusion)
    except ConfigError:
        pass
    else:
        assert get_class(cfg.model._target_).__name__ in message, message
    with pytest.raises(Exception) as built:
        build(cfg, preset)
    assert config_error(built.value) is not None, f"the model raised {built.value!r} instead of a ConfigError"
    return message


def test_every_preset_and_option_is_covered() -> None:
    assert set(TINY) == set(MODEL_PRESETS) == set(OWN_ENTRY) | set(STAGE_MODULE_LEVELS)
    builtin = {"early", "mid", "late", "mid_attention", "frm_ffm", "film_cross_attention", "wase_vfe"}
    assert set(FUSION_OPTIONS) >= builtin
    table = {m: {f for f in builtin if accepts(m, f)} for m in MODEL_PRESETS}
    assert table == {"unet": {"early", "mid", "late", "mid_attention"},
                     "deeplabv3plus": {"early", "mid", "late", "mid_attention"},
                     "unet3d": {"early", "mid", "late", "mid_attention"}, "segformer": {"early"},
                     "prithvi": {"early", "mid", "late", "mid_attention"},
                     "terramind": {"early", "mid", "late", "mid_attention"},
                     "cmx": {"frm_ffm"}, "dualstream": {"film_cross_attention"}, "ms2mnet": {"wase_vfe"}}


@pytest.mark.parametrize("preset, option", PAIRS, ids=[f"{m}-{f}" for m, f in PAIRS])
def test_preset_with_fusion_option_builds_as_named_or_is_refused(preset: str, option: str, tmp_path: Path) -> None:
    cfg = compose_train([*tiny_overrides(preset), f"fusion={option}"], tmp_path)
    if not accepts(preset, option):
        message = assert_refused(cfg, preset)
        assert "valid" in message  # says what the model accepts
        return
    check_config(cfg)
    assert_built_as_named(cfg, build(cfg, preset))


def test_fixed_fusion_refuses_the_fusion_group_instead_of_ignoring_it(tmp_path: Path) -> None:
    cfg = compose_train([*tiny_overrides("cmx"), "fusion=late"], tmp_path)
    assert assert_refused(cfg, "cmx") == (
        "fusion.level=late is not supported by CMX; valid levels: mid (CMX's fusion is fixed: mid/frm_ffm, an FRM "
        "and an FFM at each fused MiT stage; only fusion.stages may vary).")
    # the preset's own entry, and the key that does vary, are honoured
    cfg = compose_train([*tiny_overrides("cmx"), "fusion.stages=[1,3]"], tmp_path)
    check_config(cfg)
    assert set(build(cfg, "cmx").fusion["ffm"]) == {"1", "3"}


@pytest.mark.parametrize("preset, stages", [("unet", "[5]"), ("deeplabv3plus", "[0,7]"), ("cmx", "[4]"),
                                            ("dualstream", "[4]"), ("unet3d", "[3]")])
def test_out_of_range_stages_are_refused_before_data(preset: str, stages: str, tmp_path: Path) -> None:
    option = {"cmx": "frm_ffm", "dualstream": "film_cross_attention"}.get(preset, "mid")
    cfg = compose_train([*tiny_overrides(preset), f"fusion={option}", f"fusion.stages={stages}"], tmp_path)
    assert "outside" in assert_refused(cfg, preset)


def test_ms2mnet_refuses_a_stage_subset(tmp_path: Path) -> None:
    cfg = compose_train([*tiny_overrides("ms2mnet"), "fusion.stages=[2,3]"], tmp_path)
    assert "fuses every stage; set fusion.stages=null" in assert_refused(cfg, "ms2mnet")


LEVELS = ("early", "mid", "late")
TYPES = ("concat", "attention", "frm_ffm", "film_cross_attention", "wase_vfe", "bogus")


def random_fusion_overrides(rng: random.Random) -> list[str]:
    """A fusion entry with some of its keys overridden at random, as a user or a sweep might."""
    overrides = [f"fusion={rng.choice(FUSION_OPTIONS)}"]
    if rng.random() < 0.7:
        overrides.append(f"fusion.level={rng.choice(LEVELS)}")
    if rng.random() < 0.5:
        overrides.append(f"fusion.type={rng.choice(TYPES)}")
    if rng.random() < 0.6:
        stages = sorted(rng.sample(range(6), rng.randint(1, 3)))
        overrides.append(f"fusion.stages={rng.choice(['null', '[' + ','.join(map(str, stages)) + ']'])}")
    if rng.random() < 0.3:
        overrides.append("fusion.module=null")
    return overrides


@pytest.mark.slow  # over a second: in the full run, not the local loop
@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_random_fusion_keys_take_effect_or_are_refused(preset: str, tmp_path: Path) -> None:
    rng = random.Random(f"fusion-keys-{preset}")
    outcomes = []
    for _ in range(8):
        overrides = random_fusion_overrides(rng)
        cfg = compose_train([*tiny_overrides(preset), *overrides], tmp_path)
        try:
            check_config(cfg)
        except ConfigError:
            assert_refused(cfg, preset)
            outcomes.append("refused")
            continue
        try:
            model = build(cfg, preset)
        except Exception as err:  # what only the built model knows (the levels its decoder reads, a GFM's neck)
            message = str(config_error(err))
            assert message.startswith("fusion.stages=") and "never" in message, f"{err!r}"
            outcomes.append("refused when built")
            continue
        assert_built_as_named(cfg, model)
        outcomes.append("built")
    assert outcomes  # (both outcomes occur across the presets; each draw is checked either way)


@pytest.mark.parametrize("preset", ["unet", "cmx", "unet3d"])
def test_a_stage_subset_that_leaves_a_stream_unused_is_refused_before_data(preset: str, tmp_path: Path) -> None:
    """Mid fusion without the last stage: the second stream's deeper stages run for nothing, never train, and
    stop DDP (find_unused_parameters=False) after the data is prepared."""
    option = {"cmx": "frm_ffm"}.get(preset, "mid")
    cfg = compose_train([*tiny_overrides(preset), f"fusion={option}", "fusion.stages=[0]"], tmp_path)
    message = assert_refused(cfg, preset)
    assert "never used" in message and "include the last stage" in message, message


def test_deeplabv3plus_fuses_the_levels_its_decoder_reads(tmp_path: Path) -> None:
    cfg = compose_train([*tiny_overrides("deeplabv3plus"), "fusion=mid"], tmp_path)
    model = build(cfg, "deeplabv3plus")
    assert sorted(model.fusion, key=int) == [str(s) for s in model.decoder.levels_read]
    cfg = compose_train([*tiny_overrides("deeplabv3plus"), "fusion=mid", "fusion.stages=[0,4]"], tmp_path)
    with pytest.raises(Exception) as err:
        build(cfg, "deeplabv3plus")
    assert "fuses stage(s) [0], which DeepLabV3PlusDecoder never reads" in str(config_error(err.value))
