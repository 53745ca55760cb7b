"""Optimiser groups, weight-decay rule and learning-rate schedules (closed form, and over a real
short run with warmup and gradient accumulation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from segplat.errors import ConfigError
from segplat.models.base import SegmentationModel
from segplat.optim import Schedule, build_optimizer, build_scheduler, no_weight_decay, remove_params
from segplat.schema import check_targets
from tests.conftest import TINY, compose_train


class Tiny(SegmentationModel):
    def __init__(self) -> None:
        super().__init__({"rgb": 3}, 2)
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.encoder.pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
        self.fusion = nn.Conv2d(4, 4, 1)
        self.decoder = nn.Sequential(nn.Conv2d(4, 2, 1), nn.LayerNorm(2))
        self.scales = nn.ModuleList([nn.Conv2d(2, 2, 1)])  # "scales" is not a scale parameter: decayed


def groups_by_name(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_groups_learning_rates_and_weight_decay(name):
    model = Tiny()
    factory = instantiate(compose_train([f"optimizer={name}"]).optimizer)
    opt = factory(model, lr=3e-4, weight_decay=0.05, encoder_lr=3e-5, fusion_lr=1e-4)
    assert isinstance(opt, torch.optim.AdamW if name == "adamw" else torch.optim.SGD)
    assert opt.defaults["momentum" if name == "sgd" else "betas"] == (0.9 if name == "sgd" else (0.9, 0.999))
    g = groups_by_name(opt)
    assert set(g) == {"encoder", "encoder_no_decay", "fusion", "fusion_no_decay", "decoder", "decoder_no_decay"}
    assert g["encoder"]["lr"] == g["encoder_no_decay"]["lr"] == 3e-5
    assert g["fusion"]["lr"] == 1e-4 and g["decoder"]["lr"] == 3e-4
    ids = {k: {id(p) for p in v["params"]} for k, v in g.items()}
    assert ids["encoder"] == {id(model.encoder[0].weight)}
    assert ids["encoder_no_decay"] == {id(model.encoder[0].bias), id(model.encoder[1].weight),
                                       id(model.encoder[1].bias), id(model.encoder.pos_embed)}
    assert ids["decoder"] == {id(model.decoder[0].weight), id(model.scales[0].weight)}
    assert all(v["weight_decay"] == 0.0 for k, v in g.items() if k.endswith("no_decay"))
    assert all(v["weight_decay"] == 0.05 for k, v in g.items() if not k.endswith("no_decay"))
    assert sum(len(v["params"]) for v in g.values()) == len(list(model.parameters()))


def test_no_weight_decay_rule():
    w2 = nn.Parameter(torch.zeros(3, 3))
    assert no_weight_decay("blocks.0.norm1.weight", nn.Parameter(torch.zeros(3)))
    assert no_weight_decay("blocks.0.attn.relative_position_bias_table", w2)
    assert no_weight_decay("cls_token", nn.Parameter(torch.zeros(1, 1, 3)))
    assert no_weight_decay("blocks.0.ls1.gamma", w2) and no_weight_decay("head.logit_scale", w2)
    assert not no_weight_decay("decoder.scales.0.weight", w2)
    assert not no_weight_decay("decoder.upscale.weight", w2)


def test_frozen_groups_and_errors():
    model = Tiny()
    opt = build_optimizer(model, frozen=["encoder"])
    assert not any(n.startswith("encoder") for n in groups_by_name(opt))
    with pytest.raises(ConfigError, match="frozen groups"):
        build_optimizer(model, frozen=["backbone"])
    with pytest.raises(ConfigError, match=r"^optimizer\.encoder_lr=-1 must be a positive number or null; null = "):
        check_targets(compose_train(["optimizer.encoder_lr=-1.0"]))
    with pytest.raises(ConfigError, match=r"^optimizer\.optimizer\.betas is not a key of optimizer\.optimizer"):
        check_targets(compose_train(["optimizer=sgd", "+optimizer.optimizer.betas=[0.9,0.99]"]))
    with pytest.raises(ConfigError, match="no trainable parameter"):
        build_optimizer(model, frozen=["encoder", "fusion", "decoder"])


def test_remove_params_in_place():
    model = Tiny()
    opt = build_optimizer(model)
    before = id(opt.param_groups)
    assert remove_params(opt, model.encoder.parameters()) == 4 + 1
    assert id(opt.param_groups) == before and not any(n.startswith("encoder") for n in groups_by_name(opt))


def closed_form(step: int, total: int, warmup: int, kind: str, power: float = 0.9, min_ratio: float = 0.0,
                warmup_ratio: float = 1e-6) -> float:
    if step < warmup:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    decay = (1 - t) ** power if kind == "poly" else 0.5 * (1 + math.cos(math.pi * t))
    return min_ratio + (1 - min_ratio) * decay


@pytest.mark.parametrize("kind", ["poly", "cosine"])
def test_schedule_closed_form_and_late_group(kind):
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3, encoder_lr=1e-4, frozen=["encoder"])
    sched = build_scheduler(opt, total_steps=20, kind=kind, warmup_epochs=1.5, steps_per_epoch=4,
                            min_lr_ratio=0.1)
    assert sched.interval == "step" and sched.warmup == 6
    for s in range(20):
        for g in opt.param_groups:
            if g["name"] != "encoder":
                assert g["lr"] == pytest.approx(1e-3 * closed_form(s, 20, 6, kind, min_ratio=0.1), rel=1e-9)
        if s == 10:  # a group joining late follows the same curve
            opt.add_param_group({"params": list(model.encoder.parameters()), "lr": 1e-4, "name": "encoder"})
            sched.add_group(opt.param_groups[-1])
        if s >= 10:
            assert opt.param_groups[-1]["lr"] == pytest.approx(1e-4 * closed_form(s, 20, 6, kind, min_ratio=0.1))
        opt.step()
        sched.step()
    state = sched.state_dict()
    with pytest.raises(Exception, match="parameter groups"):  # a resume whose optimiser lacks the late group
        Schedule(build_optimizer(model, lr=1e-3, frozen=["encoder"]), 20).load_state_dict(state)


def test_plateau_reduces_on_the_monitored_metric_with_a_late_group():
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3, frozen=["encoder"])
    sched = build_scheduler(opt, total_steps=10, kind="plateau", mode="min", factor=0.5, patience=1)
    assert sched.interval == "validation"
    for v in (1.0, 0.5, 0.6, 0.7):  # improves, then two bad validations > patience 1
        sched.step(v)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)
    opt.add_param_group({"params": list(model.encoder.parameters()), "lr": 1e-4, "name": "encoder"})
    sched.add_group(opt.param_groups[-1])
    for v in (0.8, 0.9):
        sched.step(v)
    assert opt.param_groups[-1]["lr"] == pytest.approx(5e-5) and opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    with pytest.raises(ConfigError, match=r"^scheduler\.mode=up is not known; use max or min; the direction of "
                                          r"callbacks\.mode\.$"):
        check_targets(compose_train(["scheduler=plateau", "scheduler.mode=up"]))


@pytest.mark.parametrize("override, refusal", [
    ("scheduler.kind=step", r"^scheduler\.kind=step is not known; use poly, cosine or plateau\.$"),
    ("scheduler.power=0", r"^scheduler\.power=0 must be a positive number\.$"),
    ("scheduler.min_lr_ratio=1.5", r"^scheduler\.min_lr_ratio=1\.5 must be a number from 0 to 1; the final "),
    ("scheduler.warmup_steps=-1", r"^scheduler\.warmup_steps=-1 must be an integer, 0 or more or null; optimiser "),
    ("scheduler.warmup_epochs=-1", r"^scheduler\.warmup_epochs=-1 must be a number, 0 or more\.$"),
    ("optimizer.weight_decay=-0.1", r"^optimizer\.weight_decay=-0\.1 must be a number, 0 or more\.$"),
    ("optimizer.lr=0", r"^optimizer\.lr=0 must be a positive number\.$"),
])
def test_optimizer_and_schedule_values_are_checked_from_their_signatures(override, refusal):
    with pytest.raises(ConfigError, match=refusal):
        check_targets(compose_train([override]))


@pytest.mark.parametrize("override, refusal", [
    ("scheduler.factor=1", r"^scheduler\.factor=1 must be a number above 0 and below 1; the multiplier of each "),
    ("scheduler.patience=-1", r"^scheduler\.patience=-1 must be an integer, 0 or more\.$"),
])
def test_plateau_values_are_checked_from_its_signature(override, refusal):
    with pytest.raises(ConfigError, match=refusal):
        check_targets(compose_train(["scheduler=plateau", override]))


# ---- a real short run: warmup + poly, gradient accumulation, encoder / head learning rates -------
@pytest.mark.slow
def test_learning_rates_per_optimiser_step_in_a_real_run(tmp_path, monkeypatch):
    from segplat.train import train

    seen: list[tuple[int, dict[str, float]]] = []
    original = Schedule.step

    def recording_step(self, metric=None):  # called right after each optimiser step: the lrs it used
        seen.append((self.step_count, {g["name"]: g["lr"] for g in self.optimizer.param_groups}))
        original(self, metric)

    monkeypatch.setattr(Schedule, "step", recording_step)
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                                "trainer.limit_val_batches=1", "trainer.accumulate_grad_batches=2",
                                "optimizer.lr=1e-3", "optimizer.encoder_lr=1e-4", "scheduler=warmup_poly",
                                "scheduler.warmup_epochs=0", "scheduler.warmup_steps=2", "scheduler.power=1.0"],
                        output_dir=run_dir)
    train(cfg)
    # 3 micro-batches per epoch, groups of 2 -> 2 optimiser steps per epoch (the short last group counts)
    total = 4
    assert [s for s, _ in seen] == list(range(total))
    base = {"encoder": 1e-4, "encoder_no_decay": 1e-4, "decoder": 1e-3, "decoder_no_decay": 1e-3,
            "fusion": 1e-3, "fusion_no_decay": 1e-3}
    for step, lrs in seen:
        assert {"encoder", "decoder"} <= set(lrs)
        for name, lr in lrs.items():
            assert lr == pytest.approx(base[name] * closed_form(step, total, 2, "poly", power=1.0), rel=1e-9), \
                (step, name)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        for name in ("encoder", "decoder"):
            expected = base[name] * closed_form(r["step"], total, 2, "poly", power=1.0)
            assert r[f"lr/{name}"] == pytest.approx(expected, abs=1e-12)


def test_warmup_steps_zero_turns_warmup_off_and_a_warmup_as_long_as_the_run_is_said(caplog) -> None:
    """warmup_steps=0 fell back to warmup_epochs (`0 or ...`); only warmup_epochs=0 turned warmup off."""
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert build_scheduler(opt, total_steps=40, warmup_steps=0, warmup_epochs=1, steps_per_epoch=4).warmup == 0
    assert build_scheduler(opt, total_steps=40, warmup_steps=None, warmup_epochs=1, steps_per_epoch=4).warmup == 4
    assert build_scheduler(opt, total_steps=40, warmup_steps=3, warmup_epochs=1, steps_per_epoch=4).warmup == 3
    assert not caplog.records
    build_scheduler(opt, total_steps=8, warmup_steps=None, warmup_epochs=2, steps_per_epoch=4)
    assert "never reaches its base value" in caplog.text


def test_a_rate_for_a_group_the_model_does_not_have_is_refused() -> None:
    """optimizer.fusion_lr with early fusion trained without a word (no fusion group exists)."""
    from tests.conftest import compose_train

    cfg = compose_train(["model.encoder.name=resnet10t", "model.decoder.channels=[16,16,16,16]"])
    model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=4)
    with pytest.raises(ConfigError, match=r"^optimizer\.fusion_lr=0\.0001 sets the fusion parameters' rate, but this "
                                          r"model has none \(its groups: encoder, decoder"):
        build_optimizer(model, lr=1e-3, fusion_lr=1e-4)
    assert build_optimizer(model, lr=1e-3, encoder_lr=1e-4).param_groups[0]["lr"] == 1e-4


@pytest.mark.parametrize("preset, key, belongs", [
    ("warmup_poly", "+scheduler.patience=5", "scheduler=plateau"),
    ("plateau", "+scheduler.warmup_epochs=2", "scheduler=warmup_poly or scheduler=cosine"),
    ("cosine", "+scheduler.power=2", "scheduler=warmup_poly"),
])
def test_a_key_of_another_schedule_kind_is_refused(preset, key, belongs):
    """build_scheduler takes every kind's parameters, so a key of another kind was accepted and did nothing; each
    kind's factory signature says which keys it reads."""
    from segplat.config import check_config
    from tests.conftest import compose_train

    name = key.split("=")[0].lstrip("+").split(".")[1]
    with pytest.raises(ConfigError, match=rf"^scheduler\.{name} does nothing for scheduler\.kind=.* it belongs to "
                                          rf"{belongs}; remove it\.$"):
        check_config(compose_train([f"scheduler={preset}", key]))
    check_config(compose_train([f"scheduler={preset}"]))  # every preset's own keys are read

