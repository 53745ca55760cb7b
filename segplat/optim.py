"""Optimisers with encoder / fusion / decoder parameter groups, and learning-rate schedules.

Each group can have its own learning rate (`encoder_lr`, `fusion_lr`, `decoder_lr`; None takes
`lr`). Norm weights, biases and position/scale parameters get no weight decay. Schedules are
stepped by the trainer once per optimiser step (not per micro-batch, not per process), except
`plateau`, which steps on the monitored validation metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

import torch
from annotated_types import Gt, Lt
from torch import nn

from segplat.errors import ConfigError
from segplat.schema import Hint, NonNegativeFloat, NonNegativeInt, PositiveFloat, Probability, variants

log = logging.getLogger("segplat")

# Parameter-name tokens (the parts between dots) that never get weight decay: position
# embeddings, class/mask tokens, relative-position tables, layer-scale and temperature parameters.
NO_DECAY_TOKENS = frozenset({"cls_token", "dist_token", "mask_token", "reg_token", "gamma", "gamma_1", "gamma_2",
                             "scale", "logit_scale", "layer_scale", "temperature", "absolute_pos_embed"})
NO_DECAY_PREFIXES = ("pos_embed", "pos_emb", "relative_position", "rel_pos")


def no_weight_decay(name: str, param: nn.Parameter, extra: frozenset[str] = frozenset()) -> bool:
    """Why: decaying norms, biases, embeddings and scales towards 0 hurts (the SegFormer / timm
    rule). Every 0-D/1-D parameter (norm weights, biases, LayerScale gammas) is exempt, as are
    parameters whose name has a token above (matched on whole tokens, so e.g. a `scales.0.conv`
    module is still decayed) and names the model lists in `no_weight_decay()` (timm's hook)."""
    if param.ndim <= 1 or name.endswith(".bias") or name in extra:
        return True
    return any(t in NO_DECAY_TOKENS or t.startswith(NO_DECAY_PREFIXES) for t in name.split("."))


def _model_no_decay_names(model: nn.Module) -> frozenset[str]:
    hook = getattr(model, "no_weight_decay", None)
    return frozenset(hook()) if callable(hook) else frozenset()


def param_groups(model: nn.Module, lr: float, weight_decay: float, group_lrs: dict[str, float | None],
                 frozen: Iterable[str] = ()) -> list[dict[str, Any]]:
    groups_of = model.grouped_parameters() if hasattr(model, "grouped_parameters") else {
        "decoder": list(model.named_parameters())}
    frozen = set(frozen)
    unknown = frozen - set(groups_of)
    if unknown:
        raise ConfigError(f"frozen groups {sorted(unknown)} are not parameter groups of the model "
                          f"({', '.join(groups_of)}).")
    absent = [g for g, g_lr in group_lrs.items() if g_lr is not None and not groups_of.get(g)]
    if absent:
        have = ", ".join(g for g, named in groups_of.items() if named)
        raise ConfigError(f"optimizer.{absent[0]}_lr={group_lrs[absent[0]]} sets the {absent[0]} parameters' rate, "
                          f"but this model has none (its groups: {have}; early fusion has no fusion modules); "
                          f"leave optimizer.{absent[0]}_lr=null.")
    extra = _model_no_decay_names(model)
    out = []
    for group, named in groups_of.items():
        if group in frozen:
            continue
        g_lr = group_lrs.get(group) or lr
        decay = [p for n, p in named if p.requires_grad and not no_weight_decay(n, p, extra)]
        no_decay = [p for n, p in named if p.requires_grad and no_weight_decay(n, p, extra)]
        if decay:
            out.append({"params": decay, "lr": g_lr, "weight_decay": weight_decay, "name": f"{group}"})
        if no_decay:
            out.append({"params": no_decay, "lr": g_lr, "weight_decay": 0.0, "name": f"{group}_no_decay"})
    return out


GroupRate = Annotated[PositiveFloat | None, Hint("null = optimizer.lr")]


def build_optimizer(model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                    lr: PositiveFloat = 1e-3, weight_decay: NonNegativeFloat = 0.01, encoder_lr: GroupRate = None,
                    fusion_lr: GroupRate = None, decoder_lr: GroupRate = None,
                    frozen: Iterable[str] = ()) -> torch.optim.Optimizer:
    """Any torch optimiser over segplat's parameter groups.

    `optimizer` is the optimiser class with its own arguments bound (Hydra's `_partial_: true` of e.g.
    `torch.optim.AdamW`; the config walker refuses an argument the class does not take); this function adds what
    is segplat's: the encoder / fusion / decoder groups, their learning rates and the no-decay split. Default:
    AdamW with torch's defaults.
    """
    groups = param_groups(model, lr, weight_decay,
                          {"encoder": encoder_lr, "fusion": fusion_lr, "decoder": decoder_lr}, frozen)
    if not groups:
        raise ConfigError("the optimiser has no trainable parameter (every group is frozen); unfreeze a group or "
                          "check the fine-tuning callback.")
    return (optimizer or torch.optim.AdamW)(groups, lr=lr, weight_decay=weight_decay)


def remove_params(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Drop `params` from a fresh optimiser's groups in place (empty groups go too); returns how many
    went. In place, so wrappers (Accelerate's AcceleratedOptimizer) and schedules keep pointing at
    the same object. Why fresh only: Adam moments of a removed parameter would be lost silently."""
    ids = {id(p) for p in params}
    if any(id(p) in ids for p in optimizer.state):
        raise RuntimeError("remove_params needs an optimiser with no state for the removed parameters.")
    removed, kept_groups = 0, []
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in ids]
        removed += len(group["params"]) - len(kept)
        if kept:
            group["params"] = kept
            kept_groups.append(group)
    optimizer.param_groups[:] = kept_groups
    return removed


class Schedule:
    """A per-optimiser-step multiplier on each group's base learning rate (`initial_lr`).

    factor(s) = warmup_ratio + (1 - warmup_ratio) * s / warmup          for s < warmup (linear warmup)
              = min_ratio + (1 - min_ratio) * decay(t), t = (s - warmup) / (total - warmup)
    with decay = (1 - t)^power (poly), (1 + cos(pi t)) / 2 (cosine) or 1 (constant). The learning
    rate used by optimiser step s + 1 is base * factor(s). The trainer steps it once per optimiser
    step, so gradient accumulation and the number of processes do not change the curve."""
    interval = "step"

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 kind: Literal["poly", "cosine", "constant"] = "poly", power: float = 0.9, min_lr_ratio: float = 0.0,
                 warmup_ratio: float = 1e-6) -> None:
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
        """A group that joins later (e.g. an unfrozen encoder) follows the same curve from now on."""
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * self.factor(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "initial_lrs": [g["initial_lr"] for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["initial_lrs"]) != len(self.optimizer.param_groups):
            from segplat.errors import CheckpointError

            raise CheckpointError(f"the checkpoint's schedule has {len(state['initial_lrs'])} parameter groups but "
                                  f"this optimiser has {len(self.optimizer.param_groups)}; resume with the config "
                                  "(optimizer, callbacks) the run was started with.")
        self.step_count = int(state["step_count"])
        for g, lr in zip(self.optimizer.param_groups, state["initial_lrs"]):
            g["initial_lr"] = lr
        self._apply()


class PlateauSchedule:
    """ReduceLROnPlateau on the monitored validation metric (stepped after each validation)."""

    interval = "validation"

    def __init__(self, optimizer: torch.optim.Optimizer, mode: Literal["max", "min"] = "max", factor: float = 0.5,
                 patience: int = 2, min_lr: float = 0.0, threshold: float = 1e-4, cooldown: int = 0) -> None:
        self.optimizer = optimizer
        self.min_lr = float(min_lr)
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor,
                                                                patience=patience, min_lr=min_lr,
                                                                threshold=threshold, cooldown=cooldown)

    def step(self, metric: float | None = None) -> None:
        if metric is not None and not math.isnan(metric):
            self._sync_min_lrs()
            self.inner.step(metric)

    def _sync_min_lrs(self) -> None:
        n = len(self.optimizer.param_groups)
        if len(self.inner.min_lrs) != n:  # a group joined or left (fine-tuning)
            self.inner.min_lrs = (list(self.inner.min_lrs) + [self.min_lr] * n)[:n]

    def add_group(self, group: dict[str, Any]) -> None:
        """The new group starts at its own lr and is reduced with the others from now on."""
        group.setdefault("initial_lr", group["lr"])
        self._sync_min_lrs()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


# -- one factory per schedule kind: each signature is the schema of `scheduler.*` for its kind ------------------
WarmupSteps = Annotated[NonNegativeInt | None, Hint("optimiser steps; when set (0 included) it wins over "
                                                    "warmup_epochs")]
MinLrRatio = Annotated[Probability, Hint("the final learning rate as a fraction of the base one")]
WarmupRatio = Annotated[Probability, Hint("the warmup's first learning rate as a fraction of the base one")]


def _warmup(warmup_steps: int | None, warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """`warmup_steps` (optimiser steps; 0 = no warmup) wins over `warmup_epochs` (converted with steps_per_epoch,
    i.e. after gradient accumulation) when it is set."""
    warmup = int(warmup_steps) if warmup_steps is not None else round(warmup_epochs * steps_per_epoch)
    if 0 < total_steps <= warmup:
        log.warning("scheduler: the warmup (%d steps) is as long as the run (%d steps), so the learning rate never "
                    "reaches its base value; lower scheduler.warmup_epochs / warmup_steps or train longer",
                    warmup, total_steps)
    return warmup


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int = 1,
                  warmup_steps: WarmupSteps = None, warmup_epochs: NonNegativeFloat = 0.0, power: PositiveFloat = 0.9,
                  min_lr_ratio: MinLrRatio = 0.0, warmup_ratio: WarmupRatio = 1e-6) -> Schedule:
    """Linear warmup, then (1 - t)^power down to min_lr_ratio."""
    return Schedule(optimizer, total_steps, _warmup(warmup_steps, warmup_epochs, steps_per_epoch, total_steps),
                    "poly", power, min_lr_ratio, warmup_ratio)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int = 1,
                    warmup_steps: WarmupSteps = None, warmup_epochs: NonNegativeFloat = 0.0,
                    min_lr_ratio: MinLrRatio = 0.0, warmup_ratio: WarmupRatio = 1e-6) -> Schedule:
    """Linear warmup, then a half cosine down to min_lr_ratio."""
    return Schedule(optimizer, total_steps, _warmup(warmup_steps, warmup_epochs, steps_per_epoch, total_steps),
                    "cosine", min_lr_ratio=min_lr_ratio, warmup_ratio=warmup_ratio)


def plateau_schedule(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int = 1,
                     mode: Annotated[Literal["max", "min"], Hint("the direction of callbacks.mode")] = "max",
                     factor: Annotated[float, Gt(0), Lt(1), Hint("the multiplier of each reduction")] = 0.5,
                     patience: NonNegativeInt = 2, min_lr: NonNegativeFloat = 0.0,
                     threshold: NonNegativeFloat = 1e-4, cooldown: NonNegativeInt = 0) -> PlateauSchedule:
    """ReduceLROnPlateau on the monitored metric (its steps and epochs are not used)."""
    return PlateauSchedule(optimizer, mode=mode, factor=factor, patience=patience, min_lr=min_lr,
                           threshold=threshold, cooldown=cooldown)


SCHEDULES: dict[str, Callable[..., Schedule | PlateauSchedule]] = {
    "poly": poly_schedule, "cosine": cosine_schedule, "plateau": plateau_schedule}


@variants("kind", SCHEDULES)
def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    kind: Literal["poly", "cosine", "plateau"] = "poly", steps_per_epoch: int = 1,
                    **options: Any) -> Schedule | PlateauSchedule:
    """The schedule of `kind` (`scheduler.kind`) with its `options`: the keys of that kind's factory above, which the
    config walker checks (a key of another kind is refused, naming the presets that read it)."""
    return SCHEDULES[kind](optimizer, total_steps, steps_per_epoch=steps_per_epoch, **options)
