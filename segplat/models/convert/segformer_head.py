"""SegFormer all-MLP decode heads from transformers, NVlabs/mmseg 0.x, CMX or segplat -> `SegFormerHead` + classifier.

Names per source (after wrapper prefixes such as `module.` are dropped), all under `decode_head.` except ours:
- stage projections: transformers `linear_c.{i}` (v4) / `linear_projections.{i}` (v5); NVlabs, mmseg 0.x and
  CMX `linear_c{i+1}`; segplat `decoder.proj.{i}`;
- fuse conv: transformers `linear_fuse`; NVlabs `linear_fuse.conv`; CMX `linear_fuse.0` (with a bias); segplat
  `decoder.fuse.0`;
- fuse BatchNorm: transformers `batch_norm`; NVlabs `linear_fuse.bn`; CMX `linear_fuse.1`; segplat `decoder.fuse.1`;
- classifier: transformers `classifier`; NVlabs and CMX `linear_pred`; segplat `head.1`.

The projections are `nn.Linear` on tokens in the references and 1x1 convs here (the same map), so their
weights gain two unit dimensions. mmseg 1.x's `SegformerHead` (`convs.{i}` with BatchNorm, `fusion_conv`) is a
different architecture and is not converted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from segplat.errors import CheckpointError
from segplat.models.convert.mit import strip_wrappers

log = logging.getLogger(__name__)

# (pattern, target): `{i}` in a target is the 0-based stage index (`{i1}` 1-based in the key), `{p}` the tensor name
_HEAD_KEYS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.(\w+)$"), "proj.{i}.{p}"),
    (re.compile(r"^decode_head\.linear_c(\d)\.proj\.(\w+)$"), "proj.{i1}.{p}"),
    (re.compile(r"^decode_head\.linear_fuse\.(weight|bias)$"), "fuse.0.{p}"),
    (re.compile(r"^decode_head\.linear_fuse\.(?:conv|0)\.(\w+)$"), "fuse.0.{p}"),
    (re.compile(r"^decode_head\.batch_norm\.(\w+)$"), "fuse.1.{p}"),
    (re.compile(r"^decode_head\.linear_fuse\.(?:bn|1)\.(\w+)$"), "fuse.1.{p}"),
    (re.compile(r"^decode_head\.(?:classifier|linear_pred)\.(weight|bias)$"), "classifier.{p}"),
    (re.compile(r"^decoder\.proj\.(\d+)\.(\w+)$"), "proj.{i}.{p}"),
    (re.compile(r"^decoder\.fuse\.([01])\.(\w+)$"), "fuse.{i}.{p}"),
    (re.compile(r"^head\.1\.(weight|bias)$"), "classifier.{p}"),
]


def convert_segformer_head(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    """The decode-head tensors of a state dict as (`SegFormerHead` state, classifier {"weight", "bias"})."""
    decoder: dict[str, torch.Tensor] = {}
    classifier: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = strip_wrappers(key)
        for pattern, target in _HEAD_KEYS:
            m = pattern.match(k)
            if not m:
                continue
            groups = m.groups()
            if target.startswith("classifier"):
                classifier[groups[-1]] = value
                break
            if "{i1}" in target:
                new = target.format(i1=int(groups[0]) - 1, p=groups[1])
            elif "{i}" in target:
                new = target.format(i=groups[0], p=groups[1])
            else:
                new = target.format(p=groups[0])
            if new.startswith("proj.") and new.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]  # a linear layer on tokens = a 1x1 conv on the map
            decoder[new] = value
            break
    return decoder, classifier


def load_segformer_head(decoder: nn.Module, classifier: nn.Conv2d, state: Mapping[str, torch.Tensor],
                        path: str | Path, width_key: str = "model.decoder_embed_dim") -> dict[str, object]:
    """Load a checkpoint's decode head into `decoder` (a `SegFormerHead`) and its classifier into `classifier`.

    The head must fit (same stages, width and fuse-conv bias), else the load is refused naming `width_key`.
    A classifier for another class count is left at its initialisation, said in one log line. Returns a
    report: {"loaded": bool, "classifier": bool, "missing": [...]}.
    """
    head, cls = convert_segformer_head(state)
    if not head:
        log.info("no SegFormer decode head in %s: the decoder and classifier start from their initialisation", path)
        return {"loaded": False, "classifier": False, "missing": []}
    own = decoder.state_dict()
    unexpected = sorted(set(head) - set(own))
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in head.items()
           if k in own and v.shape != own[k].shape]
    if unexpected or bad:
        width = head["fuse.0.weight"].shape[0] if "fuse.0.weight" in head else "?"
        detail = f"unexpected {unexpected[:4]}" if unexpected else f"{len(bad)} shape mismatches, e.g. {bad[0]}"
        raise CheckpointError(f"the decode head in {path} does not fit this model's ({detail}); it is {width} wide: "
                              f"set {width_key}={width} and the backbone of that checkpoint.")
    missing = [k for k in own if k not in head and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"the decode head in {path} lacks {missing[:4]}; the file is incomplete or of another "
                              "head architecture (mmseg 1.x SegformerHead is not supported).")
    decoder.load_state_dict(head, strict=False)
    loaded_classifier = bool(cls) and all(k in cls and cls[k].shape == v.shape
                                          for k, v in classifier.state_dict().items())
    if loaded_classifier:
        classifier.load_state_dict(cls)
        log.info("loaded the SegFormer decode head and classifier from %s", path)
    else:
        found = cls["weight"].shape[0] if "weight" in cls else "no"
        log.info("loaded the SegFormer decode head from %s but not its classifier (%s classes; this model predicts "
                 "%d): the classifier starts from its initialisation", path, found, classifier.out_channels)
    return {"loaded": True, "classifier": loaded_classifier, "missing": []}
