"""Single loss terms. Each takes logits (B, C, H, W) and target (B, H, W) and honours `ignore_index`.

Facts every term keeps (tested in tests/losses):
- ignored pixels change neither the value nor the gradient (their gradient is exactly zero);
- a batch with no valid pixel gives 0 with a finite (zero) gradient, never NaN;
- the arithmetic runs in float32 with autocast switched off, so bf16/fp16 training is stable;
- no host sync where it can be avoided (CE, focal and Dice are mask-weighted sums, not boolean
  indexing); OHEM and Lovász sort, which syncs anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from annotated_types import Gt, Le
from pydantic import AllowInfNan
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.schema import Hint, NonNegativeFloat, NonNegativeInt, OpenFraction

Weight = Annotated[NonNegativeFloat, AllowInfNan(False)]
ClassWeights = Annotated[Sequence[Weight] | None, Hint("one weight per class; null = all 1")]


def _as_class_vector(values: float | Sequence[float] | None) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(values, dtype=torch.float32).flatten()


def option_key(term: nn.Module, option: str) -> str:
    """The full config key of one of a term's options, for the refusals only the data can trigger (a weight per
    class): `loss.terms.<name>.<option>` once `SegLoss` has named the term, else `<TermClass>.<option>`."""
    return f"{getattr(term, 'config_path', type(term).__name__)}.{option}"


class LossTerm(nn.Module):
    """Base for terms; `ignore_index` is set by SegLoss from the dataset so it is one value everywhere.

    Subclasses implement `compute(logits, target, valid)` on float32 tensors; `valid` is the
    (B, H, W) bool mask and `target` has ignored pixels replaced by class 0 (so gathers stay in
    range; their contribution is masked out). `config_path` (set by SegLoss) names the term's config node."""

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"{type(self).__name__} expects logits (B, C, H, W) and target (B, H, W); got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}.")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            target = target.long()
            valid = target != self.ignore_index
            safe = torch.where(valid, target, torch.zeros_like(target))
            return self.compute(logits.float(), safe, valid)

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_options(self) -> None:
        """Refuse options that only fail together (the signature checks each alone); SegLoss calls it once it has
        named the term, so the refusal names the term's full key."""

    def _check_classes(self, vec: torch.Tensor | None, num_classes: int, option: str) -> None:
        if vec is not None and vec.numel() not in (1, num_classes):
            raise ConfigError(f"{option_key(self, option)} has {vec.numel()} values but the model predicts "
                              f"{num_classes} classes; give one value per class.")


def _class_probs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and p of the target class, (B, H, W)."""
    logp = F.log_softmax(logits, dim=1)
    logp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    return logp, logp_t


class CrossEntropyLoss(LossTerm):
    """Cross-entropy with optional class weights and label smoothing (PyTorch's definitions: the
    mean over valid pixels is weighted by the target class's weight, as `F.cross_entropy` does)."""

    def __init__(self, class_weights: ClassWeights = None, label_smoothing: OpenFraction = 0.0,
                 ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.register_buffer("class_weights", _as_class_vector(class_weights), persistent=False)
        self.label_smoothing = float(label_smoothing)

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-pixel loss (0 where ignored) and the per-pixel weight of the mean's denominator."""
        w = self.class_weights
        self._check_classes(w, logits.shape[1], "class_weights")
        safe = torch.where(valid, target, torch.full_like(target, self.ignore_index))
        return F.cross_entropy(logits, safe, weight=w, ignore_index=self.ignore_index, reduction="none",
                               label_smoothing=self.label_smoothing)

    def denominator(self, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.class_weights is None:
            return valid.sum().float()
        return (self.class_weights.to(target.device)[target] * valid).sum()

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        loss = self.pixel_loss(logits, target, valid)
        return loss.sum() / self.denominator(target, valid).clamp_min(1e-12)


class OhemCrossEntropyLoss(CrossEntropyLoss):
    """Online hard example mining cross-entropy, per batch (the CMX / mmseg `OhemCrossEntropy`).

    The probability of the true class is computed for every valid pixel of the batch. If fewer
    than `min_kept` pixels are valid, all are kept; else the threshold is the larger of `thresh`
    and the `min_kept`-th smallest probability, and pixels whose probability is <= the threshold
    are kept (so at least `min_kept` hard pixels count even when the model is confident). The
    loss is the cross-entropy averaged over the kept pixels. The selection carries no gradient.

    `min_kept` counts pixels per batch (per device batch under DDP), as CMX's `OhemCrossEntropy2d`
    does; mmseg's `OHEMPixelSampler(min_kept=...)` counts per image and multiplies by the batch size.
    Give `min_kept_per_image` (with `min_kept=null`) to use an mmseg config's figure as it is: the
    batch figure is then `min_kept_per_image` x the batch size of each call."""

    def __init__(self, thresh: Annotated[float, Gt(0), Le(1), Hint("a probability of the true class")] = 0.7,
                 min_kept: Annotated[NonNegativeInt | None, Hint("pixels per batch, as in CMX")] = 100_000,
                 class_weights: ClassWeights = None, label_smoothing: OpenFraction = 0.0, ignore_index: int = 255,
                 min_kept_per_image: Annotated[NonNegativeInt | None, Hint("pixels per image, as in mmseg")] = None,
                 ) -> None:
        super().__init__(class_weights, label_smoothing, ignore_index)
        self.thresh = float(thresh)
        self.min_kept = None if min_kept is None else int(min_kept)
        self.min_kept_per_image = None if min_kept_per_image is None else int(min_kept_per_image)

    def check_options(self) -> None:
        if (self.min_kept is None) == (self.min_kept_per_image is None):
            raise ConfigError(f"{option_key(self, 'min_kept')}={self.min_kept} and min_kept_per_image="
                              f"{self.min_kept_per_image}: give exactly one (min_kept per batch as in CMX, or "
                              "min_kept_per_image as in mmseg, the other null).")

    def batch_min_kept(self, batch_size: int) -> int:
        return self.min_kept if self.min_kept is not None else self.min_kept_per_image * batch_size

    @torch.no_grad()
    def kept_mask(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        min_kept = self.batch_min_kept(logits.shape[0])
        num_valid = int(valid.sum())
        if num_valid == 0 or num_valid < min_kept:
            return valid
        prob = F.softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        threshold = torch.tensor(self.thresh, device=prob.device)
        if min_kept > 0:
            kth = prob[valid].kthvalue(min_kept).values
            threshold = torch.maximum(threshold, kth)
        return valid & (prob <= threshold)

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        kept = self.kept_mask(logits, target, valid)
        loss = self.pixel_loss(logits, target, kept)
        return loss.sum() / self.denominator(target, kept).clamp_min(1e-12)


Absent = Annotated[Literal["exclude", "include"], Hint("what a class with no pixel in the batch does")]


class DiceLoss(LossTerm):
    """Soft Dice on softmax probabilities, per class over the whole batch, `1 - mean_c dice_c` with
    dice_c = (2 sum(p_c y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth) over valid pixels.

    Absent classes (no valid target pixel of that class in the batch): `absent="exclude"` (default)
    leaves them out of the mean, so the loss does not depend on how many classes a batch lacks and
    a class never seen cannot dominate; `absent="include"` keeps them (their dice is
    smooth / (sum(p_c) + smooth), which then pushes their probability down). A batch with no
    valid pixel gives 0."""

    def __init__(self, smooth: NonNegativeFloat = 1.0, absent: Absent = "exclude",
                 class_weights: ClassWeights = None, ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.smooth = float(smooth)
        self.absent = absent
        self.register_buffer("class_weights", _as_class_vector(class_weights), persistent=False)

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        self._check_classes(self.class_weights, num_classes, "class_weights")
        prob = F.softmax(logits, dim=1) * valid.unsqueeze(1)
        onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * valid.unsqueeze(1)
        dims = (0, 2, 3)
        inter = (prob * onehot).sum(dims)
        card = prob.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (card + self.smooth).clamp_min(1e-12)
        weight = torch.ones_like(dice) if self.class_weights is None else \
            self.class_weights.to(dice.device).expand(num_classes).clone()
        if self.absent == "exclude":
            weight = weight * (onehot.sum(dims) > 0)
        else:
            weight = weight * valid.any()
        return ((1 - dice) * weight).sum() / weight.sum().clamp_min(1e-12)


class FocalLoss(LossTerm):
    """Softmax multi-class focal loss, -alpha_y (1 - p_y)^gamma log p_y, averaged over valid pixels.

    `alpha` is a scalar (scales every pixel) or one value per class; gamma=0 and alpha=1 give
    cross-entropy."""

    def __init__(self, alpha: Annotated[Weight | Sequence[Weight] | None, Hint("one number, or one per class")] = None,
                 gamma: NonNegativeFloat = 2.0, ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.gamma = float(gamma)
        self.register_buffer("alpha", _as_class_vector(alpha), persistent=False)

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self._check_classes(self.alpha, logits.shape[1], "alpha")
        _, logp_t = _class_probs(logits, target)
        one_minus_p = (-torch.expm1(logp_t)).clamp_min(0.0)  # 1 - p, accurate near p = 1
        if self.gamma == 0:
            mod = torch.ones_like(one_minus_p)
        else:
            mod = one_minus_p.clamp_min(1e-30) ** self.gamma if self.gamma < 1 else one_minus_p ** self.gamma
        loss = -mod * logp_t
        if self.alpha is not None:
            a = self.alpha.to(loss.device)
            loss = loss * (a[target] if a.numel() > 1 else a)
        loss = loss * valid
        return loss.sum() / valid.sum().clamp_min(1)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018,
    Alg. 1), for each column of `gt_sorted` (N, C) independently."""
    gts = gt_sorted.sum(0, keepdim=True)
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.shape[0] > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)
    return jaccard


class LovaszSoftmaxLoss(LossTerm):
    """Lovász-softmax (Berman et al., CVPR 2018) on softmax probabilities.

    `classes`: "present" (default: classes with at least one valid pixel in the image/batch),
    "all", or a list of class ids. `per_image`: compute per image and average over images that
    have at least one valid pixel (the reference code counts an all-ignored image as 0, which
    would let ignored pixels change the value; here they do not)."""

    def __init__(self, classes: Literal["present", "all"] | Sequence[NonNegativeInt] = "present",
                 per_image: bool = False, ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.classes = classes if isinstance(classes, str) else [int(c) for c in classes]
        self.per_image = bool(per_image)

    def flat(self, prob: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """prob (C, N), target (N,), valid (N,) -> loss, or None when nothing counts."""
        num_classes = prob.shape[0]
        prob, target = prob[:, valid].t(), target[valid]  # (M, C), (M,)
        if target.numel() == 0:
            return None
        fg = F.one_hot(target, num_classes).float()
        if self.classes == "present":
            chosen = fg.sum(0) > 0
        elif self.classes == "all":
            chosen = torch.ones(num_classes, dtype=torch.bool, device=prob.device)
        else:
            bad = [c for c in self.classes if not 0 <= c < num_classes]
            if bad:
                raise ConfigError(f"{option_key(self, 'classes')}={self.classes} names {bad}, outside "
                                  f"0..{num_classes - 1}; list class ids of the dataset.")
            chosen = torch.zeros(num_classes, dtype=torch.bool, device=prob.device)
            chosen[self.classes] = True
        fg, prob = fg[:, chosen], prob[:, chosen]
        if fg.shape[1] == 0:
            return None
        errors = (fg - prob).abs()
        errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
        grad = lovasz_grad(fg.gather(0, perm))
        return (errors_sorted * grad).sum(0).mean()

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(logits, dim=1)
        b, c = prob.shape[:2]
        if self.per_image:
            losses = [self.flat(prob[i].reshape(c, -1), target[i].reshape(-1), valid[i].reshape(-1))
                      for i in range(b)]
        else:
            losses = [self.flat(prob.transpose(0, 1).reshape(c, -1), target.reshape(-1), valid.reshape(-1))]
        kept = [x for x in losses if x is not None]
        if not kept:
            return logits.sum() * 0.0
        return torch.stack(kept).mean()
