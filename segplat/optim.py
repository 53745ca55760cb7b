"""Optimisers with encoder / fusion / decoder parameter groups, and learning-rate schedules.

Each group can have its own learning rate (`encoder_lr`, `fusion_lr`, `decoder_lr`; None takes
`lr`). Norm weights, biases and position/scale parameters get no weight decay. Schedules are
stepped by the trainer once per optimiser step (not per micro-batch, not per process), except
`plateau`, which steps on the monitored validation metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from segplat.errors import ConfigError

NO_DECAY_KEYWORDS = ("pos_embed", "pos_emb", "cls_token", "relative_position", "gamma", "scale", "temperature")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_KEYWORDS)


def param_groups(model: nn.Module, lr: float, weight_decay: float, group_lrs: dict[str, float | None],
                 frozen: Iterable[str] = ()) -> list[dict[str, Any]]:
    groups_of = model.grouped_parameters() if hasattr(model, "grouped_parameters") else {
        "decoder": list(model.named_parameters())}
    frozen = set(frozen)
    out = []
    for group, named in groups_of.items():
        if group in frozen:
            continue
        g_lr = group_lrs.get(group) or lr
        decay = [p for n, p in named if p.requires_grad and not no_weight_decay(n, p)]
        no_decay = [p for n, p in named if p.requires_grad and no_weight_decay(n, p)]
        if decay:
            out.append({"params": decay, "lr": g_lr, "weight_decay": weight_decay, "name": f"{group}"})
        if no_decay:
            out.append({"params": no_decay, "lr": g_lr, "weight_decay": 0.0, "name": f"{group}_no_decay"})
    return out


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.01,
                    encoder_lr: float | None = None, fusion_lr: float | None = None,
                    decoder_lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                    momentum: float = 0.9, nesterov: bool = False,
                    frozen: Iterable[str] = ()) -> torch.optim.Optimizer:
    for key, value in (("optimizer.lr", lr), ("optimizer.encoder_lr", encoder_lr),
                       ("optimizer.fusion_lr", fusion_lr), ("optimizer.decoder_lr", decoder_lr)):
        if value is not None and not value > 0:
            raise ConfigError(f"{key}={value} must be a positive number.")
    groups = param_groups(model, lr, weight_decay,
                          {"encoder": encoder_lr, "fusion": fusion_lr, "decoder": decoder_lr}, frozen)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    raise ConfigError(f"optimizer.name={name!r} is not known; use adamw or sgd.")


class Schedule:
    """A per-optimiser-step multiplier on each group's base learning rate (warmup + decay)."""

    interval = "step"

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 kind: str = "poly", power: float = 0.9, min_lr_ratio: float = 0.0,
                 warmup_ratio: float = 1e-6) -> None:
        if kind not in ("poly", "cosine", "constant"):
            raise ConfigError(f"scheduler.kind={kind!r} is not known; use poly, cosine, constant or plateau.")
        self.optimizer = optimizer
        self.total = max(1, int(total_steps))
        self.warmup = max(0, int(warmup_steps))
        self.kind, self.power, self.min_ratio, self.warmup_ratio = kind, power, min_lr_ratio, warmup_ratio
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "poly":
            f = (1 - t) ** self.power
        elif self.kind == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * t))
        else:
            f = 1.0
        return self.min_ratio + (1 - self.min_ratio) * f

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    def step(self, metric: float | None = None) -> None:
        self.step_count += 1
        self._apply()

    def add_group(self, group: dict[str, Any]) -> None:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * self.factor(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "initial_lrs": [g["initial_lr"] for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        for g, lr in zip(self.optimizer.param_groups, state["initial_lrs"]):
            g["initial_lr"] = lr
        self._apply()


class PlateauSchedule:
    """ReduceLROnPlateau on the monitored validation metric (stepped after each validation)."""

    interval = "validation"

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "max", factor: float = 0.5,
                 patience: int = 2, min_lr: float = 0.0, **_: Any) -> None:
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor,
                                                                patience=patience, min_lr=min_lr)

    def step(self, metric: float | None = None) -> None:
        if metric is not None:
            self.inner.step(metric)

    def add_group(self, group: dict[str, Any]) -> None:
        self.inner.min_lrs.append(self.inner.min_lrs[-1] if self.inner.min_lrs else 0.0)
        self.inner.default_min_lr = None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "poly",
                    warmup_steps: int = 0, warmup_epochs: float = 0.0, steps_per_epoch: int = 1,
                    power: float = 0.9, min_lr_ratio: float = 0.0, mode: str = "max", factor: float = 0.5,
                    patience: int = 2) -> Schedule | PlateauSchedule:
    if kind == "plateau":
        return PlateauSchedule(optimizer, mode=mode, factor=factor, patience=patience)
    warmup = warmup_steps or round(warmup_epochs * steps_per_epoch)
    return Schedule(optimizer, total_steps, warmup, kind, power, min_lr_ratio)
