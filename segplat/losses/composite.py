"""SegLoss: sum of weighted terms on the main logits, plus the same on each auxiliary head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.messages import first_line
from segplat.schema import Hint, NonNegativeFloat

# where the loss config sits: a term's runtime refusals name `loss.terms.<name>.<option>`
LOSS_KEY = "loss"
LOSS_DOC = "docs/user-project.md, \"The loss term contract\""


class SegLoss(nn.Module):
    """`terms`: name -> loss term module; `weights`: name -> weight (default 1);
    `aux_weights`: output key -> weight ("out" is the main head, weight 1 unless given; "final" is
    accepted as another name for it); `bind_aux_outputs` adds the model's default weights and refuses a weight
    for an output the model lacks; an output with no weight is an error, so a head is never dropped silently."""

    def __init__(self, terms: Mapping[str, nn.Module],
                 weights: Annotated[Mapping[str, NonNegativeFloat] | None, Hint("term name -> weight")] = None,
                 aux_weights: Annotated[Mapping[str, NonNegativeFloat] | None,
                                        Hint("model output -> weight; 0 leaves it out")] = None,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if not terms:
            raise ConfigError(f"{LOSS_KEY}.terms is empty; name at least one loss term.")
        self.terms = nn.ModuleDict(dict(terms))
        self._name_terms()
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in self.terms}
        unknown = [k for k in (weights or {}) if k not in self.terms]
        if unknown:
            raise ConfigError(f"{LOSS_KEY}.weights names {unknown}, which are not in {LOSS_KEY}.terms "
                              f"({list(self.terms)}).")
        aux = {("out" if k == "final" else str(k)): float(v) for k, v in (aux_weights or {}).items()}
        if "final" in (aux_weights or {}) and "out" in (aux_weights or {}):
            raise ConfigError("loss.aux_weights names both final and out, which are the same head; keep one.")
        self.aux_weights = {"out": 1.0, **aux}
        self.set_ignore_index(ignore_index)

    def _name_terms(self) -> None:
        """Give each term the key its runtime refusals name (`losses.terms.option_key`), then let it check the
        options that only fail together."""
        for name, term in self.terms.items():
            term.config_path = f"{LOSS_KEY}.terms.{name}"
            if hasattr(term, "check_options"):
                term.check_options()

    def bind_aux_outputs(self, aux_outputs: Mapping[str, float | None], model_name: str) -> None:
        """Weigh the auxiliary outputs a model returns (`SegmentationModel.aux_outputs`: name -> default weight):
        `loss.aux_weights` over the model's defaults. A weight for an output the model does not return would
        never be used, and an output with no weight would fail at the first step: both are refused here."""
        given = {k: v for k, v in self.aux_weights.items() if k != "out"}
        unknown = sorted(k for k in given if k not in aux_outputs)
        if unknown:
            has = f"returns only {sorted(aux_outputs)}" if aux_outputs else "returns no auxiliary outputs"
            raise ConfigError(f"loss.aux_weights names {unknown}, but model {model_name} {has}, so those weights "
                              f"would do nothing; remove them (loss.aux_weights=null keeps the model's defaults).")
        unweighted = [k for k, w in aux_outputs.items() if w is None and k not in given]
        if unweighted:
            raise ConfigError(f"model {model_name} returns the auxiliary output {unweighted[0]}, which has no default "
                              f"weight; give one with loss.aux_weights={{{unweighted[0]}: 0.1}} (0 leaves it out).")
        self.aux_weights = {"out": self.aux_weights["out"],
                            **{k: float(w) for k, w in aux_outputs.items() if w is not None}, **given}

    def check_terms(self, num_classes: int, ignore_index: int) -> None:
        """Before any data: every term returns a finite scalar on a tiny random batch and honours the dataset's
        ignore index (changing the logits of ignored pixels changes nothing), so a user's term that forgets the
        ignore index is refused here instead of training on pixels without a label."""
        self.set_ignore_index(ignore_index)
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, num_classes, 8, 8, generator=g)
        target = torch.randint(0, num_classes, (2, 8, 8), generator=g)
        ignored = torch.zeros_like(target, dtype=torch.bool)
        ignored[:, :, :4] = True
        target[ignored] = ignore_index
        other = torch.where(ignored[:, None], torch.randn(logits.shape, generator=g) * 10, logits)
        for name, term in self.terms.items():
            where = f"loss.terms.{name} ({type(term).__module__}.{type(term).__qualname__})"
            try:
                with torch.no_grad():
                    value, changed = term(logits, target), term(other, target)
            except Exception as err:
                raise ConfigError(f"{where} failed on a batch whose target holds the ignore index {ignore_index} "
                                  f"({first_line(err)}); a term must skip pixels equal to self.ignore_index (see "
                                  f"{LOSS_DOC}).") from err
            if not (isinstance(value, torch.Tensor) and value.numel() == 1 and torch.isfinite(value).all()):
                tensor = isinstance(value, torch.Tensor)
                got = (f"a tensor of shape {tuple(value.shape)}" if tensor and value.numel() > 1
                       else repr(value) if tensor else type(value).__name__)
                raise ConfigError(f"{where} returned {got} on a random batch; a term returns a finite scalar tensor "
                                  f"(see {LOSS_DOC}).")
            if not torch.allclose(value, changed, rtol=1e-4, atol=1e-6):
                raise ConfigError(f"{where} does not honour the ignore index: changing the logits of pixels labelled "
                                  f"{ignore_index} changed its value ({value.item():.4g} -> {changed.item():.4g}); "
                                  "subclass segplat.losses.LossTerm, which masks them, or leave out pixels equal to "
                                  f"self.ignore_index yourself (see {LOSS_DOC}).")

    def set_ignore_index(self, ignore_index: int) -> None:
        self.ignore_index = int(ignore_index)
        for term in self.terms.values():
            term.ignore_index = self.ignore_index

    def forward(self, outputs: Mapping[str, torch.Tensor] | torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(outputs, torch.Tensor):
            outputs = {"out": outputs}
        parts: dict[str, torch.Tensor] = {}
        total = None
        for key, logits in outputs.items():
            if key not in self.aux_weights:
                raise ConfigError(f"the model returns an output {key!r} with no loss weight; add it to "
                                  f"loss.aux_weights (have {list(self.aux_weights)}).")
            w_out = self.aux_weights[key]
            if w_out == 0:
                continue
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            for name, term in self.terms.items():
                value = term(logits, target)
                parts[name if key == "out" else f"{key}/{name}"] = value.detach()
                contrib = w_out * self.weights[name] * value
                total = contrib if total is None else total + contrib
        assert total is not None
        return total, parts
