"""The search-space check that runs before the first trial: composed with Hydra from conf/ exactly as the trials
compose, judged by segplat.config.check_config; no trial is launched, no study is created (fast)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from segplat.config import CONF_DIR, check_config
from segplat.errors import ConfigError
from segplat.sweep import space as sp
from segplat.sweep.validate import SpaceChecker

PRODUCTION = OmegaConf.load(CONF_DIR / "sweep" / "fusion_patch_lr.yaml").hydra.sweeper


def check_space(spec: dict[str, Any], fixed: Sequence[str] = (), baselines: Sequence[Any] = (),
                seen: list[DictConfig] | None = None, **kwargs: Any) -> SpaceChecker:
    """Run the checker on conf/train.yaml; `seen` collects every config it judged (after check_config)."""

    def recording_check(cfg: DictConfig) -> None:
        check_config(cfg)
        if seen is not None:
            seen.append(cfg)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        checker = SpaceChecker(
            sp.parse_params(spec), list(fixed),
            lambda overrides: compose(config_name="train", overrides=list(overrides), return_hydra_config=True),
            check=recording_check, group_options=lambda g: GlobalHydra.instance().config_loader().get_group_options(g),
            **kwargs)
        checker.baselines = checker.run(baselines)
    return checker


def fusion_of(cfg: DictConfig) -> tuple[str, str, Any]:
    stages = OmegaConf.to_container(cfg.fusion).get("stages")
    return cfg.fusion.level, cfg.fusion.type, tuple(stages) if stages else None


@pytest.mark.slow
def test_the_production_space_is_checked_draw_by_draw() -> None:
    seen: list[DictConfig] = []
    checker = check_space(dict(PRODUCTION.params), baselines=OmegaConf.to_container(PRODUCTION.baselines), seen=seen)
    # every fusion the space can draw reached a composed config (type/stages only with level=mid)
    assert {fusion_of(c) for c in seen} == {("early", "concat", None), ("late", "concat", None)} | {
        ("mid", kind, stages) for kind in ("concat", "attention") for stages in ((1, 2, 3, 4), (2, 3, 4), (3, 4))}
    assert {c.dataset.patch_size for c in seen} == {64, 96, 128}
    # the continuous learning rates at both ends of their ranges, and the baselines' value
    assert {c.optimizer.encoder_lr for c in seen} == {1e-5, 1e-2, 2e-3}
    assert {c.optimizer.decoder_lr for c in seen} == {1e-4, 3e-2, 2e-3}
    assert checker.report.exhaustive and checker.report.compositions == 1  # no config group is searched
    assert checker.baselines[1] == {"fusion.level": "mid", "fusion.type": "concat", "fusion.stages": "[1,2,3,4]",
                                    "dataset.patch_size": 64, "optimizer.encoder_lr": 2e-3,
                                    "optimizer.decoder_lr": 2e-3}


@pytest.mark.parametrize(("spec", "message"), [
    ({"optimizer.encoder_lrr": "tag(log, interval(1e-5, 1e-2))"},
     r"sweep parameter optimizer\.encoder_lrr names no key .*did you mean optimizer\.encoder_lr\?"),
    ({"optimiser.lr": "choice(0.1, 0.01)"}, r"optimiser\.lr names no key .*did you mean optimizer\.lr\?"),
    ({"fusion": "choice(early, midd)"}, r"fusion=midd, which is not an option of the fusion config group \(did you "
                                        r"mean mid\?\)"),
    ({"fusion.level": "choice(early, mid)", "fusion.type": {"when": {"fusion.levl": "mid"}, "values": "choice(a)"}},
     r"fusion\.type\.when names fusion\.levl, .*did you mean fusion\.level\?"),
    ({"fusion.level": "choice(early, mid)", "fusion.type": {"when": {"fusion.level": "midd"}, "values": "choice(a)"}},
     r"fusion\.level=midd, which fusion\.level never draws \(one of early, mid\)"),
    ({"optimizer.lr": "interval(1e-4, 1e-2)", "x": {"when": {"optimizer.lr": 1e-3}, "values": "choice(1, 2)"}},
     r"names optimizer\.lr, a continuous parameter"),
    ({"dataset.patch_size": "interval(32, 64)"}, r"dataset\.patch_size draws floats, but .* is an integer \(64\)"),
    ({"model.encoder.name": "range(1, 3)"}, r"model\.encoder\.name draws numbers, but .* is resnet18"),
    ({"optimizer.weight_decay": {"when": {"fusion.level": "mid"}, "values": "choice(0.0, 0.1)"}},
     r"optimizer\.weight_decay is never searched: its condition \(fusion\.level=mid\) holds in no draw"),
])
def test_a_broken_space_is_refused_in_one_sentence(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_space(spec)


def test_model_and_fusion_combinations_the_model_refuses_are_named() -> None:
    spec = {"model": "choice(unet, segformer)", "fusion.level": "choice(early, mid)"}
    with pytest.raises(ConfigError) as err:
        check_space(spec)
    text = str(err.value)
    assert "draw 1 of 4 checked configurations" in text
    assert "[model=segformer fusion.level=mid]" in text and "not supported by SegFormer" in text
    # the same space with the refused pair conditioned away is accepted; the model group is composed per choice
    seen: list[DictConfig] = []
    spec["fusion.level"] = {"when": {"model": "unet"}, "values": "choice(early, mid)"}
    checker = check_space(spec, seen=seen)
    assert sorted((c.model._target_.rsplit(".", 1)[1], c.fusion.level) for c in seen) == [
        ("SegFormer", "early"), ("Segmenter", "early"), ("Segmenter", "mid")]
    assert checker.report.compositions == 3  # the fixed overrides alone, then model=unet and model=segformer


def test_fixed_overrides_and_numeric_ends_reach_the_check() -> None:
    with pytest.raises(ConfigError, match=r"\[fusion\.level=mid\].*not supported by SegFormer"):
        check_space({"fusion.level": "choice(early, mid)"}, fixed=["model=segformer"])
    with pytest.raises(ConfigError, match=r"\[optimizer\.lr=0\.0\].*optimizer\.lr=0 must be a positive number"):
        check_space({"optimizer.lr": "interval(0.0, 0.1)"})


@pytest.mark.parametrize(("baseline", "message"), [
    ({"optimizer.lrr": 0.1}, r"baselines\[0\] sets optimizer\.lrr, which is not searched"),
    ({"fusion.level": "midd"}, r"baselines\[0\]\.fusion\.level=midd is not a value fusion\.level draws"),
    ({"optimizer.lr": 1.0}, r"baselines\[0\]\.optimizer\.lr=1\.0 is not a value .* from 0\.0001 to 0\.01"),
    ({"fusion.level": "early", "fusion.type": "attention"}, r"sets fusion\.type, which the baseline's other values"),
])
def test_baselines_are_checked_before_the_study_exists(baseline: dict[str, Any], message: str) -> None:
    spec = {"fusion.level": "choice(early, mid)", "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
            "fusion.type": {"when": {"fusion.level": "mid"}, "values": "choice(concat, attention)"}}
    with pytest.raises(ConfigError, match=message):
        check_space(spec, baselines=[baseline])


def test_a_large_space_still_checks_every_fusion_combination_and_every_value() -> None:
    seen: list[DictConfig] = []
    spec = {"fusion.level": "choice(early, mid)", "fusion.type": "choice(concat, attention)",
            "dataset.patch_size": "choice(32, 64, 96)", "optimizer.weight_decay": "choice(0.0, 0.01, 0.1)",
            "seed": "range(0, 3)"}  # 0, 1, 2, 3: the stop is drawn too
    with pytest.raises(ConfigError, match=r"\[fusion\.level=early fusion\.type=attention[^\]]*\]: "
                                          r"fusion\.type=attention is not supported by Segmenter at level early"):
        check_space(spec, max_draws=10, seen=seen)
    assert {(c.fusion.level, c.fusion.type) for c in seen} == {("early", "concat"), ("mid", "concat"),
                                                               ("mid", "attention")}
    assert {c.dataset.patch_size for c in seen} == {32, 64, 96}
    assert {c.optimizer.weight_decay for c in seen} == {0.0, 0.01, 0.1}
    assert {c.seed for c in seen} == {0, 1, 2, 3}
    assert len(seen) < 2 * 3 * 3 * 4, "the fallback must not enumerate the whole product"
