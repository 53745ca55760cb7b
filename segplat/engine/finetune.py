"""`EncoderFineTuning`: train the head on a frozen encoder first, then unfreeze the encoder.

Why: with a pretrained encoder and a randomly initialised head, the head's first, large gradients
would wreck the pretrained features; freezing the encoder until the head has settled (its
validation metric stops improving, or a set epoch) and then fine-tuning it at a lower learning
rate keeps them.

How (no trainer change needed):
- the trainer builds the optimiser from every group; at start (or, on a resume, just before the
  optimiser state is loaded) the encoder's parameters get `requires_grad=False` and are removed
  from that optimiser in place (`segplat.optim.remove_params`), so wrappers and the schedule keep
  pointing at the same object;
- the switch sets `requires_grad=True` again and adds the encoder as its own groups (`encoder`,
  `encoder_no_decay`, built by the same optimiser factory, so weight decay and betas match) at
  `encoder_lr`, or `lr_factor` x the head's base learning rate; the schedule learns about them
  (`scheduler.add_group`) and follows the same curve from then on;
- the switch is printed, and from then on every validation record in metrics.jsonl has
  `lr/encoder` (the groups' names); the epoch of the switch is kept in checkpoints, and on resume
  `before_optimizer_restore` re-adds the groups before the optimiser state is loaded;
- with several processes the DDP wrapper is rebuilt after each change, since DDP only reduces
  gradients of parameters that required grad when it was built.
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, Annotated, Any

from torch import nn

from segplat.engine.callbacks import Callback, improved
from segplat.errors import ConfigError
from segplat.optim import remove_params
from segplat.schema import Hint, NonNegativeFloat, PositiveFloat, PositiveInt

if TYPE_CHECKING:
    import torch

    from segplat.engine.trainer import Trainer

log = logging.getLogger("segplat")


def inner_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    opt = trainer.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") else opt


class EncoderFineTuning(Callback):
    """Encoder frozen until the monitored metric has not improved for `patience` validations
    (by more than `min_delta`) or until epoch `unfreeze_epoch` starts (1-based; whichever comes
    first; set either to null to disable it), then trained at `encoder_lr` (or `lr_factor` x
    the head's learning rate). `train_bn=False` also holds the frozen group's batch-norm layers in eval mode, so
    their running statistics stay as loaded (Lightning's `BaseFinetuning(train_bn=False)`); the default (True)
    lets them follow the training data."""

    name = "finetune"

    def __init__(self, patience: PositiveInt | None = 3,
                 unfreeze_epoch: Annotated[PositiveInt | None, Hint("1-based: the first epoch the encoder trains")]
                 = None, encoder_lr: PositiveFloat | None = None, lr_factor: PositiveFloat = 0.1,
                 min_delta: NonNegativeFloat = 0.0, group: str = "encoder",
                 train_bn: bool = True) -> None:
        if patience is None and unfreeze_epoch is None:
            raise ConfigError("callbacks.finetune needs patience or unfreeze_epoch (or both); set one.")
        self.patience = None if patience is None else int(patience)
        self.unfreeze_epoch = None if unfreeze_epoch is None else int(unfreeze_epoch)
        self.encoder_lr = encoder_lr
        self.lr_factor = float(lr_factor)
        self.min_delta = float(min_delta)
        self.group = group
        self.train_bn = bool(train_bn)
        self.best: float | None = None
        self.wait = 0
        self.switched = False
        self.switch_epoch: int | None = None  # the encoder trains from epoch switch_epoch + 1 on
        self.switch_lr: float | None = None
        self._frozen_in: int | None = None  # id of the optimiser the encoder was removed from

    # -- parameters and optimiser ----------------------------------------------------------------
    def _params(self, trainer: Trainer) -> list[nn.Parameter]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if not hasattr(model, "grouped_parameters"):
            raise ConfigError("callbacks.finetune needs a segplat SegmentationModel (with grouped_parameters); "
                              "remove the finetune callback for this model.")
        groups = model.grouped_parameters()
        named = groups.get(self.group, [])
        if not named:
            raise ConfigError(f"callbacks.finetune.group={self.group!r}: the model has no parameter in that group "
                              f"(groups: {', '.join(g for g, v in groups.items() if v)}).")
        return [p for _, p in named]

    def _freeze(self, trainer: Trainer) -> None:
        """Idempotent: once per optimiser object (the trainer builds one per fit)."""
        opt = inner_optimizer(trainer)
        if self._frozen_in == id(opt):
            return
        params = self._params(trainer)
        for p in params:
            p.requires_grad_(False)
        remove_params(opt, params)
        if not opt.param_groups:
            raise ConfigError(f"callbacks.finetune froze the {self.group} group and nothing is left to train; "
                              "freeze a model with a trainable head.")
        self._frozen_in = id(opt)
        self._rewrap(trainer)

    def _head_lr(self, opt: torch.optim.Optimizer) -> float:
        heads = [g for g in opt.param_groups if g.get("name") in ("decoder", "decoder_no_decay")] or opt.param_groups
        return max(g.get("initial_lr", g["lr"]) for g in heads)

    def _unfreeze(self, trainer: Trainer, lr: float | None = None) -> float:
        opt = inner_optimizer(trainer)
        params = self._params(trainer)
        for p in params:
            p.requires_grad_(True)
        lr = float(lr if lr is not None else self.encoder_lr or self.lr_factor * self._head_lr(opt))
        model = trainer.accelerator.unwrap_model(trainer.model)
        others = [g for g in model.grouped_parameters() if g != self.group]
        try:
            donor = trainer.optimizer_factory(model, frozen=others)
        except TypeError as err:
            raise ConfigError("callbacks.finetune needs an optimizer factory that accepts frozen=[...] "
                              "(segplat.optim.build_optimizer, as optimizer=adamw and optimizer=sgd use).") from err
        for group in donor.param_groups:
            group = {k: v for k, v in group.items() if k != "initial_lr"}
            group["lr"] = lr
            opt.add_param_group(group)
            if trainer.scheduler is not None:
                trainer.scheduler.add_group(opt.param_groups[-1])
        self.switched = True
        self.switch_lr = lr
        self._rewrap(trainer)
        return lr

    def _rewrap(self, trainer: Trainer) -> None:
        """DDP fixes the set of reduced parameters when it wraps the model: wrap again."""
        acc = trainer.accelerator
        if acc.num_processes <= 1:
            return
        old = trainer.model
        raw = acc.unwrap_model(old)
        if old is raw:
            return
        acc._models = [m for m in acc._models if m is not old]
        trainer.model = None
        del old
        gc.collect()
        trainer.model = acc.prepare_model(raw)

    def _switch(self, trainer: Trainer, reason: str) -> None:
        lr = self._unfreeze(trainer)
        self.switch_epoch = trainer.state.epoch
        self.best, self.wait = None, 0
        msg = (f"fine-tuning: {self.group} unfrozen after epoch {self.switch_epoch} ({reason}); it trains from "
               f"epoch {self.switch_epoch + 1} at lr {lr:.3g}")
        log.info(msg)  # Hydra's job logging prints it and keeps it in the run's log (tqdm.write printed it twice)

    # -- hooks -----------------------------------------------------------------------------------
    def before_optimizer_restore(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """Resume: give the fresh optimiser the groups the checkpoint's optimiser had."""
        self._freeze(trainer)
        saved = (state.get("callbacks") or {}).get(self.name) or {}
        if saved.get("switched") and not self.switched:
            self._unfreeze(trainer, lr=saved.get("switch_lr"))

    def on_fit_start(self, trainer: Trainer) -> None:
        self._freeze(trainer)
        if not self.train_bn and not self._frozen_norms(trainer):
            raise ConfigError(f"callbacks.finetune.train_bn=false keeps batch-norm statistics, but the {self.group} "
                              "group has no BatchNorm layer (e.g. a transformer's LayerNorms keep none), so it would "
                              "do nothing; remove it.")

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if not self.switched and self.unfreeze_epoch is not None and trainer.state.epoch + 1 >= self.unfreeze_epoch:
            self._switch(trainer, f"unfreeze_epoch={self.unfreeze_epoch}")
        if not self.switched and not self.train_bn:
            for norm in self._frozen_norms(trainer):
                norm.eval()  # the trainer has just set training mode; its running statistics stay as loaded

    def _frozen_norms(self, trainer: Trainer) -> list[nn.Module]:
        """The batch-norm layers of the frozen group (train_bn=false keeps their statistics while frozen)."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        frozen = {id(p) for p in self._params(trainer)}
        return [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and (id(m.weight) in frozen if m.weight is not None else model.param_group(f"{name}.weight") ==
                     self.group)]

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.switched or self.patience is None:
            return
        value = metrics.get(trainer.monitor)
        if improved(value, self.best, trainer.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._switch(trainer, f"{trainer.monitor} has not improved for {self.wait} validations")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "switched": self.switched, "switch_epoch": self.switch_epoch,
                "switch_lr": self.switch_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))
        self.switch_epoch, self.switch_lr = state.get("switch_epoch"), state.get("switch_lr")
        if bool(state.get("switched")) != self.switched:
            raise RuntimeError("fine-tuning state mismatch: before_optimizer_restore did not run before "
                               "load_state_dict.")
