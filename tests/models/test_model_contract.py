"""The contracts of a user's own code, enforced in one place each (docs/user-project.md): a plain `nn.Module` model
works with the documented defaults, and a model, layout or loss term missing part of its contract is refused
before any data, in one sentence naming the member and the page."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from segplat.data.layouts.base import Layout, ModalitySpec, build_layout
from segplat.errors import ConfigError
from segplat.losses import CrossEntropyLoss, DiceLoss, FocalLoss, LovaszSoftmaxLoss, OhemCrossEntropyLoss, SegLoss
from segplat.models.build import PlainModel, build_model, fusion_check
from segplat.optim import build_optimizer

HERE = __name__
RGB_DSM = {"rgb": 3, "dsm": 1}


class Plain(nn.Module):
    """The minimal model: no segplat base class, logits out."""

    def __init__(self, modalities: dict[str, int], num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.names = list(modalities)
        self.encoder = nn.Conv2d(sum(modalities.values()), width, 3, padding=1)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, inputs):
        return self.head(torch.relu(self.encoder(torch.cat([inputs[m] for m in self.names], 1))))


class PlainWithOwnMembers(Plain):
    """A plain model that names its own groups and returns an auxiliary output."""

    aux_outputs: ClassVar[dict[str, float]] = {"aux": 0.25}

    def param_group(self, name: str) -> str:
        return "fusion" if name.startswith("encoder.bias") else "decoder"

    def forward(self, inputs):
        out = super().forward(inputs)
        return {"out": out, "aux": F.avg_pool2d(out, 2)}


class NoNumClasses(nn.Module):
    def __init__(self, modalities: dict[str, int]) -> None:
        super().__init__()

    def forward(self, inputs):
        return inputs


class NoForward(nn.Module):
    def __init__(self, modalities: dict[str, int], num_classes: int) -> None:
        super().__init__()


class NotAModule:
    def __init__(self, modalities: dict[str, int], num_classes: int) -> None:
        pass


class BadAux(Plain):
    aux_outputs: ClassVar[list[str]] = ["aux"]


class BadGroup(Plain):
    def param_group(self, name: str) -> str:
        return "backbone"


class ReturnsList(Plain):
    def forward(self, inputs):
        return [super().forward(inputs)]


class HalfSize(Plain):
    def forward(self, inputs):
        return F.avg_pool2d(super().forward(inputs), 2)


def build(cls: type, **keys) -> nn.Module:
    return build_model(OmegaConf.create({"_target_": f"{HERE}.{cls.__name__}", **keys}), RGB_DSM, 3)


def batch(size: int = 16) -> dict[str, torch.Tensor]:
    return {"rgb": torch.randn(2, 3, size, size), "dsm": torch.randn(2, 1, size, size)}


def test_a_plain_module_gets_the_documented_defaults():
    model = build(Plain, width=5)
    assert isinstance(model, PlainModel) and isinstance(model.net, Plain) and model.net.encoder.out_channels == 5
    assert model.aux_outputs == {}
    groups = {g: [n for n, _ in params] for g, params in model.grouped_parameters().items()}
    assert groups == {"encoder": ["net.encoder.weight", "net.encoder.bias"], "fusion": [],
                      "decoder": ["net.head.weight", "net.head.bias"]}
    out = model(batch())
    assert set(out) == {"out"} and out["out"].shape == (2, 3, 16, 16)
    # the optimiser's groups follow the name prefixes: optimizer.encoder_lr reaches the user's encoder only
    opt = build_optimizer(model, torch.optim.SGD, lr=0.1, encoder_lr=0.01)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.net.encoder.weight)] == 0.01 and lrs[id(model.net.head.weight)] == 0.1


def test_a_plain_modules_own_members_replace_the_defaults():
    model = build(PlainWithOwnMembers)
    assert model.aux_outputs == {"aux": 0.25}
    groups = {g: [n for n, _ in params] for g, params in model.grouped_parameters().items()}
    assert groups["fusion"] == ["net.encoder.bias"] and groups["encoder"] == []
    out = model(batch())
    assert out["aux"].shape == (2, 3, 8, 8)
    loss = SegLoss({"ce": CrossEntropyLoss()})
    loss.bind_aux_outputs(model.aux_outputs, "PlainWithOwnMembers")
    assert loss.aux_weights == {"out": 1.0, "aux": 0.25}
    total, parts = loss(out, torch.randint(0, 3, (2, 16, 16)))
    assert set(parts) == {"ce", "aux/ce"} and torch.isfinite(total)


@pytest.mark.parametrize("cls, message", [
    (NoNumClasses, r"model\._target_=.*NoNumClasses: its __init__ takes no num_classes keyword"),
    (NoForward, r"model\._target_=.*NoForward defines no forward"),
    (NotAModule, r"model\._target_=.*NotAModule is not a torch\.nn\.Module class"),
    (BadAux, r"BadAux\.aux_outputs is \['aux'\]; it must map each auxiliary output"),
    (BadGroup, r"BadGroup\.param_group\('encoder\.weight'\) returned 'backbone'; it must return encoder, fusion or "),
])
def test_a_model_missing_part_of_the_contract_is_refused_before_data(cls, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(cls)
    assert "docs/user-project.md" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cls, message", [
    (ReturnsList, r"ReturnsList\.forward returned list; it must return logits"),
    (HalfSize, r"HalfSize\.forward returned logits of shape \(2, 3, 8, 8\); they must be \(B, 3, 16, 16\)"),
])
def test_a_wrong_output_is_refused_at_the_first_forward(cls, message):
    model = build(cls)
    with pytest.raises(ConfigError, match=message):
        model(batch())


def test_a_plain_module_takes_early_fusion_only():
    check = fusion_check(Plain)
    assert check({"level": "early", "type": "concat"}).level == "early"
    with pytest.raises(ConfigError, match=r"fusion=mid/attention is not supported by Plain, a plain nn\.Module, "
                                          r"which takes early fusion only.*SegmentationModel"):
        check({"level": "mid", "type": "attention"})


# -- layouts -------------------------------------------------------------------------------------------------
class NotALayout:
    def __init__(self, root=None) -> None:
        self.root = root


class NoRead(Layout):
    classes = ("a", "b")
    palette = ((0, 0, 0), (255, 255, 255))

    @property
    def modalities(self):
        return {"rgb": ModalitySpec(("r", "g", "b"))}

    def scan(self):
        return {}


class NoClasses(NoRead):
    classes = ()
    palette = ()

    def read(self, ref):
        raise NotImplementedError


class ShortPalette(NoClasses):
    classes = ("a", "b", "c")
    palette = ((0, 0, 0),)


@pytest.mark.parametrize("cls, message", [
    (NotALayout, r"NotALayout is not a segplat\.data\.layouts\.base\.Layout subclass"),
    (NoRead, r"NoRead does not define read, which every Layout defines"),
    (NoClasses, r"NoClasses has 0 classes and 0 palette colours"),
    (ShortPalette, r"ShortPalette has 3 classes and 1 palette colours"),
])
def test_a_layout_missing_part_of_the_contract_is_refused_before_a_file_is_read(cls, message):
    with pytest.raises(ConfigError, match=rf"^dataset\.layout\._target_=.*{message}") as err:
        build_layout(OmegaConf.create({"_target_": f"{HERE}.{cls.__name__}"}), None)
    assert "docs/user-project.md" in str(err.value)


# -- loss terms -----------------------------------------------------------------------------------------------
class ForgetsIgnoreIndex(nn.Module):
    """Cross-entropy without the ignore index: fails on the value 255."""

    def forward(self, logits, target):
        return F.cross_entropy(logits, target)


class CountsIgnoredPixels(nn.Module):
    """Runs, but scores ignored pixels as class 0: silently wrong."""

    ignore_index = 255

    def forward(self, logits, target):
        return F.cross_entropy(logits, target.clamp(max=logits.shape[1] - 1))


class MasksItself(nn.Module):
    """A plain module that honours self.ignore_index on its own: accepted."""

    ignore_index = 255

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index)


class NotAScalar(MasksItself):
    def forward(self, logits, target):
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")


@pytest.mark.parametrize("term, message", [
    (ForgetsIgnoreIndex(), r"failed on a batch whose target holds the ignore index 255 \(.*\); a term must skip"),
    (CountsIgnoredPixels(), r"does not honour the ignore index: changing the logits of pixels labelled 255 changed "),
    (NotAScalar(), r"returned a tensor of shape \(2, 8, 8\) on a random batch; a term returns a finite scalar "),
])
def test_a_loss_term_that_mishandles_the_ignore_index_is_refused(term, message):
    loss = SegLoss({"ce": CrossEntropyLoss(), "mine": term})
    with pytest.raises(ConfigError, match=rf"^loss\.terms\.mine \({HERE}\.{type(term).__name__}\) {message}") as err:
        loss.check_terms(num_classes=4, ignore_index=255)
    assert "docs/user-project.md" in str(err.value)


def test_segplats_terms_and_a_self_masking_plain_term_pass_the_check():
    terms = {"ce": CrossEntropyLoss(class_weights=[1, 2, 1, 1], label_smoothing=0.1), "dice": DiceLoss(),
             "focal": FocalLoss(), "lovasz": LovaszSoftmaxLoss(), "ohem": OhemCrossEntropyLoss(),
             "mine": MasksItself()}
    loss = SegLoss(terms)
    loss.check_terms(num_classes=4, ignore_index=0)  # another ignore index reaches every term
    assert all(t.ignore_index == 0 for t in loss.terms.values())
