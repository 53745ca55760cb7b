"""Weights for `MS2MNet`: a whole model saved by the release (`DrWuHonglin/MS2MNet`) or by segplat, or ImageNet
ResNet weights (torchvision or timm names, which agree) for both streams.

segplat's MS2MNet keeps the release's module names, so a released state dict needs no renaming; two things
differ and are handled here: the release's streams hold a `layer4` they never run (dropped, said in the log),
and the release leaves VFE, ASAF and DFE undefined, so a released file has no tensors for `vfeBlock*`,
`decoder.p1/p2/p3` and `dfeBlock` (they start from their initialisation, said in the log). Anything else that
is missing or left over refuses the file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segplat.errors import CheckpointError
from segplat.models.convert.mit import read_weights
from segplat.models.weights import adapt_input_weight

if TYPE_CHECKING:
    from segplat.models.ms2mnet import MS2MNet, ResNetStream

log = logging.getLogger(__name__)

#: built by the release's ResNet50 wrapper but never run (its forward stops at layer3)
RELEASE_UNUSED = re.compile(r"^(rgb|dsm)_backbone\.(layer4|fc)\.")
#: modules the release references but does not define: a released state dict cannot hold them
RELEASE_UNDEFINED = ("dfeBlock.", "vfeBlock", "decoder.p1.", "decoder.p2.", "decoder.p3.", "decoder.res2_proj.")
CLASSIFIERS = ("decoder.seg_head.head.2.0.", "decoder.aux_head3.2.", "decoder.aux_head2.2.")


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def dsm_first_conv(rgb_weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The release's DSM first conv: the mean of the pretrained RGB filters (c bands: that mean repeated, / c)."""
    mean = rgb_weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_chans, 1, 1) / in_chans


def _first_conv_key(stream: ResNetStream) -> str:
    return next(k for k, v in stream.state_dict().items() if v.ndim == 4)


def load_imagenet_streams(model: MS2MNet, state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, list[str]]:
    """ImageNet ResNet weights into both streams: the optical first conv adapted (timm's rule), the DSM's the mean."""
    report: dict[str, list[str]] = {}
    for name, stream in (("rgb_backbone", model.rgb_backbone), ("dsm_backbone", model.dsm_backbone)):
        own = stream.state_dict()
        first = _first_conv_key(stream)
        trunk = {k: v for k, v in state.items() if k in own}
        if first not in trunk:
            raise CheckpointError(f"pretrained={path} is not a ResNet weights file of the stream's layout (no "
                                  f"{first}); use torchvision's or timm's weights of model.backbone.")
        if name == "dsm_backbone":
            trunk[first] = dsm_first_conv(trunk[first], stream.in_chans)
        elif trunk[first].shape[1] != stream.in_chans:
            trunk[first] = adapt_input_weight(trunk[first], stream.in_chans)
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in trunk.items() if v.shape != own[k].shape]
        missing = [k for k in own if k not in trunk and not k.endswith("num_batches_tracked")]
        if bad or missing:
            raise CheckpointError(f"pretrained={path} does not fit model.backbone ({bad[:1] or missing[:2]}); use the "
                                  "ImageNet weights of the same ResNet.")
        stream.load_state_dict(trunk, strict=False)
        report[name] = sorted(trunk)
    log.info("MS2MNet: both ResNet streams from %s (%d tensors each; the DSM stream's first conv is the mean of the "
             "RGB filters)", path, len(report["rgb_backbone"]))
    return {"streams": ["rgb_backbone", "dsm_backbone"], "initialised": [], "dropped": []}


def load_ms2mnet_state(model: MS2MNet, state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, list[str]]:
    """A whole-model state dict under the release's names (the release's own, or segplat's)."""
    own = model.state_dict()
    dropped = sorted(k for k in state if RELEASE_UNUSED.match(k)
                     or (not model.aux_heads and k.startswith(("decoder.aux_head3.", "decoder.aux_head2."))))
    state = {k: v for k, v in state.items() if k not in dropped}
    for stream in (model.rgb_backbone, model.dsm_backbone):
        key = f"{'rgb' if stream is model.rgb_backbone else 'dsm'}_backbone.{_first_conv_key(stream)}"
        if key in state and state[key].shape[1] != stream.in_chans:
            state[key] = adapt_input_weight(state[key], stream.in_chans)
    skipped = [k for k in state if k.startswith(CLASSIFIERS) and k in own and state[k].shape != own[k].shape]
    classes = int(state[skipped[0]].shape[0]) if skipped else model.num_classes
    state = {k: v for k, v in state.items() if k not in skipped}
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and k not in skipped]
    not_released = [k for k in missing if k.startswith(RELEASE_UNDEFINED)]
    other = [k for k in missing if k not in not_released]
    if unexpected or bad or other:
        raise CheckpointError(f"pretrained={path} does not fit this MS2MNet (unexpected {unexpected[:3]}, shape "
                              f"mismatches {bad[:2]}, missing {other[:3]}); check model.backbone and "
                              "model.decode_channels against the checkpoint's.")
    model.load_state_dict(state, strict=False)
    if dropped:
        log.info("MS2MNet: dropped %d tensors this model does not run (the release's unused layer4; aux heads when "
                 "model.aux_heads=false) from %s", len(dropped), path)
    if not_released:
        modules = sorted({k.split(".")[0] if not k.startswith("decoder.") else ".".join(k.split(".")[:2])
                          for k in not_released})
        log.info("MS2MNet: %s has no weights for %s (not defined in the release): they start from their "
                 "initialisation", path, ", ".join(modules))
    if skipped:
        log.info("MS2MNet: loaded %s but not its classifiers (%d classes; this model predicts %d)", path,
                 classes, model.num_classes)
    return {"streams": [], "initialised": not_released, "dropped": dropped + skipped}


def load_ms2mnet_pretrained(model: MS2MNet, path: str | Path) -> dict[str, list[str]]:
    """`model.pretrained=`: a whole MS2MNet (release or segplat names) or ImageNet ResNet weights for the streams."""
    state = _strip_module(read_weights(path))
    if any(k.startswith(("rgb_backbone.", "dsm_backbone.")) for k in state):
        return load_ms2mnet_state(model, state, path)
    return load_imagenet_streams(model, state, path)
