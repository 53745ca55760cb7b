"""Each loss term against an independent, naive reference (per-pixel loops, explicit formulas, the
Lovász extension computed from its set-function definition), values and gradients, on random
logits and labels with ignored pixels."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from segplat.errors import ConfigError
from segplat.losses import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
    SegLoss,
)
from segplat.schema import check_targets
from tests.conftest import compose_train

IGNORE = 255
B, C, H, W = 2, 4, 5, 6


def make_batch(seed: int = 0, ignore_frac: float = 0.3, absent: int | None = None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, C, (B, H, W), generator=g)
    if absent is not None:
        target[target == absent] = (absent + 1) % C
    target[torch.rand(B, H, W, generator=g) < ignore_frac] = IGNORE
    return logits, target


def pixels(target: torch.Tensor):
    """(b, i, j) of every valid pixel, in a fixed order."""
    return [(b, i, j) for b in range(target.shape[0]) for i in range(target.shape[1])
            for j in range(target.shape[2]) if int(target[b, i, j]) != IGNORE]


def softmax_at(logits: torch.Tensor, b: int, i: int, j: int) -> torch.Tensor:
    z = logits[b, :, i, j]
    e = torch.exp(z - z.max())
    return e / e.sum()


# ---- references ------------------------------------------------------------------------------
def ref_ce(logits, target, weights=None, smoothing=0.0):
    num, den = 0.0, 0.0
    for b, i, j in pixels(target):
        y = int(target[b, i, j])
        logp = torch.log(softmax_at(logits, b, i, j))
        w = torch.ones(C, dtype=logits.dtype) if weights is None else torch.tensor(weights, dtype=logits.dtype)
        loss = (1 - smoothing) * -w[y] * logp[y] + smoothing / C * -(w * logp).sum()
        num = num + loss
        den += float(w[y])
    return num / den if den else logits.sum() * 0


def ref_ohem(logits, target, thresh, min_kept):
    pix = pixels(target)
    probs = [float(softmax_at(logits.detach(), b, i, j)[int(target[b, i, j])]) for b, i, j in pix]
    if len(pix) < min_kept:
        kept = pix
    else:
        t = thresh
        if min_kept > 0:
            t = max(thresh, sorted(probs)[min_kept - 1])
        kept = [p for p, pr in zip(pix, probs) if pr <= t]
    num = sum(-torch.log(softmax_at(logits, b, i, j))[int(target[b, i, j])] for b, i, j in kept)
    return num / len(kept)


def ref_dice(logits, target, smooth, absent):
    losses = []
    for c in range(C):
        inter, sp, sy = 0.0, 0.0, 0.0
        for b, i, j in pixels(target):
            p = softmax_at(logits, b, i, j)[c]
            y = float(int(target[b, i, j]) == c)
            inter, sp, sy = inter + p * y, sp + p, sy + y
        if absent == "exclude" and sy == 0:
            continue
        losses.append(1 - (2 * inter + smooth) / (sp + sy + smooth))
    return sum(losses) / len(losses)


def ref_focal(logits, target, alpha, gamma):
    total, n = 0.0, 0
    for b, i, j in pixels(target):
        y = int(target[b, i, j])
        p = softmax_at(logits, b, i, j)[y]
        a = 1.0 if alpha is None else (alpha if isinstance(alpha, float) else alpha[y])
        total = total - a * (1 - p) ** gamma * torch.log(p)
        n += 1
    return total / n


def jaccard_loss_of_set(fg: np.ndarray, mistakes: set[int]) -> float:
    """Delta_J(M) = |M| / |{y = c} u M| (Berman et al., eq. 3)."""
    union = set(np.flatnonzero(fg).tolist()) | mistakes
    return len(mistakes) / len(union) if union else 0.0


def ref_lovasz_flat(probs: list[torch.Tensor], labels: list[int], classes) -> torch.Tensor | None:
    """The Lovász extension from its definition: sort errors, weight each by the increase of the set
    function when its pixel joins the set of mistakes."""
    if not labels:
        return None
    lab = np.array(labels)
    chosen = [c for c in range(C) if (lab == c).any()] if classes == "present" else list(range(C))
    losses = []
    for c in chosen:
        fg = (lab == c).astype(float)
        errors = [abs(fg[k] - p[c]) for k, p in enumerate(probs)]
        order = np.argsort([-float(e.detach()) for e in errors], kind="stable")
        loss, prev, mistakes = 0.0, 0.0, set()
        for k in order:
            mistakes.add(int(k))
            cur = jaccard_loss_of_set(fg, mistakes)
            loss = loss + errors[k] * (cur - prev)
            prev = cur
        losses.append(loss)
    return sum(losses) / len(losses) if losses else None


def ref_lovasz(logits, target, classes="present", per_image=False):
    groups = [[p for p in pixels(target) if p[0] == b] for b in range(B)] if per_image else [pixels(target)]
    out = []
    for group in groups:
        v = ref_lovasz_flat([softmax_at(logits, *p) for p in group], [int(target[p]) for p in group], classes)
        if v is not None:
            out.append(v)
    return sum(out) / len(out) if out else logits.sum() * 0


CASES = [
    ("ce", lambda: CrossEntropyLoss(ignore_index=IGNORE), lambda lg, t: ref_ce(lg, t)),
    ("ce_weighted_smooth", lambda: CrossEntropyLoss([1.0, 2.0, 0.5, 3.0], 0.1, IGNORE),
     lambda lg, t: ref_ce(lg, t, [1.0, 2.0, 0.5, 3.0], 0.1)),
    ("ohem_min_kept", lambda: OhemCrossEntropyLoss(0.3, 20, ignore_index=IGNORE),
     lambda lg, t: ref_ohem(lg, t, 0.3, 20)),
    ("ohem_thresh", lambda: OhemCrossEntropyLoss(0.6, 5, ignore_index=IGNORE), lambda lg, t: ref_ohem(lg, t, 0.6, 5)),
    ("ohem_too_few", lambda: OhemCrossEntropyLoss(0.3, 10_000, ignore_index=IGNORE),
     lambda lg, t: ref_ohem(lg, t, 0.3, 10_000)),
    ("ohem_per_image", lambda: OhemCrossEntropyLoss(0.3, None, min_kept_per_image=7, ignore_index=IGNORE),
     lambda lg, t: ref_ohem(lg, t, 0.3, 7 * lg.shape[0])),  # mmseg's convention: per image x batch size
    ("dice_exclude", lambda: DiceLoss(1.0, "exclude", ignore_index=IGNORE),
     lambda lg, t: ref_dice(lg, t, 1.0, "exclude")),
    ("dice_include", lambda: DiceLoss(0.5, "include", ignore_index=IGNORE),
     lambda lg, t: ref_dice(lg, t, 0.5, "include")),
    ("focal", lambda: FocalLoss(None, 2.0, IGNORE), lambda lg, t: ref_focal(lg, t, None, 2.0)),
    ("focal_alpha_vec", lambda: FocalLoss([0.25, 0.5, 1.0, 2.0], 1.5, IGNORE),
     lambda lg, t: ref_focal(lg, t, [0.25, 0.5, 1.0, 2.0], 1.5)),
    ("focal_alpha_scalar", lambda: FocalLoss(0.25, 0.5, IGNORE), lambda lg, t: ref_focal(lg, t, 0.25, 0.5)),
    ("lovasz", lambda: LovaszSoftmaxLoss(ignore_index=IGNORE), lambda lg, t: ref_lovasz(lg, t)),
    ("lovasz_all", lambda: LovaszSoftmaxLoss("all", ignore_index=IGNORE), lambda lg, t: ref_lovasz(lg, t, "all")),
    ("lovasz_per_image", lambda: LovaszSoftmaxLoss(per_image=True, ignore_index=IGNORE),
     lambda lg, t: ref_lovasz(lg, t, per_image=True)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,make,ref", CASES, ids=IDS)
def test_value_and_gradient_match_reference(name, make, ref):
    # class 2 absent from the labels: exercises present/absent-class handling
    absent = 2 if "dice" in name or "lovasz" in name else None
    logits, target = make_batch(seed=zlib.crc32(name.encode()) % 1000, absent=absent)
    x = logits.clone().requires_grad_(True)
    value = make()(x, target)
    (grad,) = torch.autograd.grad(value, x)
    xr = logits.clone().requires_grad_(True)
    expected = ref(xr, target)
    (grad_ref,) = torch.autograd.grad(expected, xr)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)
    ignored = (target == IGNORE).unsqueeze(1).expand_as(grad)
    assert ignored.any() and (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any()


@pytest.mark.parametrize("name,make,ref", CASES, ids=IDS)
def test_ignored_pixels_do_not_change_the_value(name, make, ref):
    logits, target = make_batch(seed=3)
    other = logits.clone()
    ign = (target == IGNORE).unsqueeze(1).expand_as(other)
    other[ign] = torch.randn(int(ign.sum()), dtype=other.dtype) * 50
    loss = make()
    assert loss(logits, target).item() == loss(other, target).item()


@pytest.mark.parametrize("name,make,ref", CASES, ids=IDS)
def test_all_ignored_gives_zero_and_finite_gradient(name, make, ref):
    logits = torch.randn(B, C, H, W, requires_grad=True)
    target = torch.full((B, H, W), IGNORE)
    value = make()(logits, target)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(value)
    assert logits.grad is not None and (logits.grad == 0).all()


@pytest.mark.parametrize("name,make,ref", CASES, ids=IDS)
def test_bf16_autocast_is_finite_and_close(name, make, ref):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, C, 1)
    x = torch.randn(B, 3, 16, 16)
    target = torch.randint(0, C, (B, 16, 16))
    target[torch.rand(B, 16, 16) < 0.2] = IGNORE
    loss = make()
    full = loss(conv(x), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        low = loss(logits, target)
    low.backward()
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert low.item() == pytest.approx(full.item(), rel=0.05, abs=0.02)


def test_ohem_keeps_at_least_min_kept_hardest_pixels():
    logits, target = make_batch(seed=5, ignore_frac=0.0)
    loss = OhemCrossEntropyLoss(thresh=0.01, min_kept=7, ignore_index=IGNORE)
    valid = target != IGNORE
    kept = loss.kept_mask(logits.float(), target, valid)
    assert int(kept.sum()) == 7  # thresh below every probability: exactly the 7 hardest (no ties)
    p = torch.softmax(logits, 1).gather(1, target.unsqueeze(1)).squeeze(1)
    assert p[kept].max() < p[~kept].min()


def test_focal_with_gamma_0_is_cross_entropy():
    logits, target = make_batch(seed=9)
    assert FocalLoss(None, 0.0, IGNORE)(logits, target).item() == pytest.approx(
        CrossEntropyLoss(ignore_index=IGNORE)(logits, target).item(), rel=1e-6)


def test_lovasz_of_a_perfect_prediction_is_zero():
    target = torch.randint(0, C, (B, H, W))
    logits = torch.nn.functional.one_hot(target, C).permute(0, 3, 1, 2).float() * 1e4
    assert LovaszSoftmaxLoss(ignore_index=IGNORE)(logits, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("overrides, refusal", [
    (["loss=dice", "loss.terms.dice.absent=sometimes"], r"^loss\.terms\.dice\.absent=sometimes is not known; use "
                                                        r"exclude or include; what a class with no pixel"),
    (["loss=dice", "loss.terms.dice.smooth=-1"], r"^loss\.terms\.dice\.smooth=-1 must be a number, 0 or more\.$"),
    (["loss=ohem", "loss.terms.ohem.thresh=1.5"], r"^loss\.terms\.ohem\.thresh=1\.5 must be a number above 0 and "
                                                  r"at most 1; a probability of the true class\.$"),
    (["loss=ohem", "loss.terms.ohem.min_kept=-1"], r"^loss\.terms\.ohem\.min_kept=-1 must be an integer, 0 or more "
                                                   r"or null; pixels per batch"),
    (["loss=lovasz", "loss.terms.lovasz.classes=most"], r"^loss\.terms\.lovasz\.classes=most must be one of present, "
                                                        r"all or a list of integers, 0 or more\.$"),
    (["loss=ce", "loss.terms.ce.label_smoothing=1"], r"^loss\.terms\.ce\.label_smoothing=1 must be a number of at "
                                                     r"least 0 and below 1\.$"),
    (["loss=ce", "loss.terms.ce.class_weights=[1,-2]"], r"^loss\.terms\.ce\.class_weights=\[1,-2\] must be a list "
                                                        r"of numbers, 0 or more or null; one weight per class"),
    (["loss=focal", "loss.terms.focal.gamma=-1"], r"^loss\.terms\.focal\.gamma=-1 must be a number, 0 or more\.$"),
    (["loss=focal", "loss.terms.focal.alpha=[0.5,inf]"], r"^loss\.terms\.focal\.alpha=\[0\.5,inf\] must be"),
    (["loss.weights.ce=-1"], r"^loss\.weights=\{ce:-1\} must be a mapping of names to numbers, 0 or more"),
    (["loss.terms.ce.label_smothing=0.1"], r"^loss\.terms\.ce\.label_smothing is not a key of loss\.terms\.ce; did "
                                           r"you mean loss\.terms\.ce\.label_smoothing\?$"),
])
def test_bad_parameters_are_refused_from_the_signatures(overrides, refusal):
    """Each sentence names the full key as a user writes it (it said `loss thresh=1.5`)."""
    with pytest.raises(ConfigError, match=refusal):
        check_targets(compose_train([o if "label_smothing" not in o else f"+{o}" for o in overrides]))


def test_refusals_only_the_data_can_trigger_name_the_key_of_the_term():
    with pytest.raises(ConfigError, match=r"^loss\.terms\.ohem\.min_kept=100 and min_kept_per_image=10: give exactly"):
        SegLoss({"ohem": OhemCrossEntropyLoss(min_kept=100, min_kept_per_image=10)})
    logits, target = make_batch()
    with pytest.raises(ConfigError, match=r"^loss\.terms\.ce\.class_weights has 2 values but the model predicts 4"):
        SegLoss({"ce": CrossEntropyLoss([1.0, 2.0])}, ignore_index=IGNORE)(logits, target)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.focal\.alpha has 3 values"):
        SegLoss({"focal": FocalLoss([1.0, 2.0, 3.0])}, ignore_index=IGNORE)(logits, target)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.lovasz\.classes=\[1, 7\] names \[7\], outside 0\.\.3"):
        SegLoss({"lovasz": LovaszSoftmaxLoss(classes=[1, 7])}, ignore_index=IGNORE)(logits, target)
    with pytest.raises(ConfigError, match=r"^DiceLoss\.class_weights has 2 values"):  # a term outside SegLoss
        DiceLoss(class_weights=[1.0, 2.0], ignore_index=IGNORE)(logits, target)


# ---- the composite loss and its configs --------------------------------------------------------
def test_segloss_weights_terms_and_aux_heads():
    logits, target = make_batch(seed=11)
    aux = torch.randn(B, C, 3, 3, dtype=torch.float64)
    ce, dice = CrossEntropyLoss(ignore_index=IGNORE), DiceLoss(ignore_index=IGNORE)
    loss = SegLoss({"ce": ce, "dice": dice}, {"ce": 1.0, "dice": 0.5}, {"f2": 0.3}, ignore_index=IGNORE)
    total, parts = loss({"out": logits, "f2": aux}, target)
    up = torch.nn.functional.interpolate(aux.float(), size=(H, W), mode="bilinear", align_corners=False)
    expected = ce(logits, target) + 0.5 * dice(logits, target) + 0.3 * (ce(up, target) + 0.5 * dice(up, target))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(parts) == {"ce", "dice", "f2/ce", "f2/dice"}
    assert SegLoss({"ce": ce}, aux_weights={"final": 2.0})(logits, target)[0].item() == pytest.approx(
        2 * ce(logits, target).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="aux_weights"):
        SegLoss({"ce": ce})({"out": logits, "f3": aux}, target)


def test_aux_weights_bind_to_the_outputs_the_model_returns():
    """A weight for an output the model lacks did nothing without a word (unet with loss.aux_weights.f2)."""
    ce = CrossEntropyLoss(ignore_index=IGNORE)
    loss = SegLoss({"ce": ce}, aux_weights={"f2": 0.5})
    loss.bind_aux_outputs({"f3": 0.3, "f2": 0.2}, "MS2MNet")  # the given weight over the model's defaults
    assert loss.aux_weights == {"out": 1.0, "f3": 0.3, "f2": 0.5}
    with pytest.raises(ConfigError, match=r"^loss\.aux_weights names \['f2'\], but model Segmenter returns no "
                                          r"auxiliary outputs, so those weights would do nothing; remove them"):
        SegLoss({"ce": ce}, aux_weights={"f2": 0.5}).bind_aux_outputs({}, "Segmenter")
    with pytest.raises(ConfigError, match=r"returns only \['f2', 'f3'\]"):
        SegLoss({"ce": ce}, aux_weights={"f4": 0.1}).bind_aux_outputs({"f2": 0.3, "f3": 0.15}, "DualStream")
    with pytest.raises(ConfigError, match=r"auxiliary output f4, which has no default weight; give one with "
                                          r"loss\.aux_weights=\{f4: 0\.1\}"):
        SegLoss({"ce": ce}).bind_aux_outputs({"f2": 0.3, "f4": None}, "DualStream")
    plain = SegLoss({"ce": ce}, aux_weights={"final": 2.0})
    plain.bind_aux_outputs({}, "Segmenter")  # the main head's weight is always allowed
    assert plain.aux_weights == {"out": 2.0}


@pytest.mark.parametrize("name,weights", [("ce", {"ce": 1.0}), ("ohem", {"ohem": 1.0}), ("dice", {"dice": 1.0}),
                                          ("focal", {"focal": 1.0}), ("lovasz", {"lovasz": 1.0}),
                                          ("ohem_dice", {"ohem": 1.0, "dice": 1.0}),
                                          ("focal_lovasz", {"focal": 0.5, "lovasz": 0.5}),
                                          ("ce_dice", {"ce": 1.0, "dice": 1.0})])
def test_loss_configs_build_and_run(name, weights):
    cfg = compose_train([f"loss={name}"])
    loss = instantiate(cfg.loss)
    loss.set_ignore_index(IGNORE)
    assert loss.weights == weights
    logits, target = make_batch(seed=2)
    total, parts = loss({"out": logits.float().requires_grad_(True)}, target)
    assert math.isfinite(total.item()) and set(parts) == set(weights)
    expected = sum(weights[k] * parts[k] for k in weights)
    assert total.item() == pytest.approx(float(expected), rel=1e-6)
