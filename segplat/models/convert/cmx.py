"""Official CMX checkpoints (`huaaaliu/RGBX_Semantic_Segmentation`, MiT backbones + MLPDecoder) -> segplat's `CMX`.

The official `EncoderDecoder` saves `{"model": state_dict, "optimizer": ..., "epoch": ..., "iteration": ...}`
with these names (after an optional `module.`), mapped here to ours:
- `backbone.patch_embed{s}` / `block{s}` / `norm{s}` (RGB stream, NVlabs MiT names) -> `encoders.0.*`;
- `backbone.extra_patch_embed{s}` / `extra_block{s}` / `extra_norm{s}` (X stream) -> `encoders.1.*`;
- `backbone.FRMs.{i}.*` -> `fusion.frm.{i}.*` and `backbone.FFMs.{i}.*` -> `fusion.ffm.{i}.*` (same sub-names);
- `decode_head.linear_c{s}` / `linear_fuse.{0,1}` / `linear_pred` -> `decoder.*` and `head.1.*`.
Both official streams take 3 channels (the X modality, e.g. HHA or depth, repeated to 3); a stream with
another channel count gets its first conv adapted as for any pretrained weights (1 channel: the sum, so a
single depth band gives exactly the official logits of that band repeated three times).
Only MiT + MLPDecoder checkpoints are converted (not the Swin, UPerNet or DeepLabV3+ variants).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segplat.errors import CheckpointError
from segplat.models.convert.mit import SOURCE_EPS, convert_mit_state_dict, mit_variant_of, strip_wrappers
from segplat.models.convert.segformer_head import convert_segformer_head
from segplat.models.weights import adapt_input_weight

if TYPE_CHECKING:
    from segplat.models.cmx import CMX

log = logging.getLogger(__name__)

_FUSION = re.compile(r"^(FRMs|FFMs)\.(\d+)\.(.+)$")
_RGB_PARTS = ("patch_embed", "block", "norm")


def is_official_cmx(keys: Sequence[str]) -> bool:
    """Whether a state dict is a whole official CMX model (an X stream and rectification modules)."""
    return any(k.startswith("extra_patch_embed") or _FUSION.match(k) for k in map(strip_wrappers, keys))


def convert_cmx_state_dict(raw: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official CMX names -> segplat CMX names. Returns (converted, keys of no known part)."""
    streams: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in raw.items():
        k = strip_wrappers(key)
        fusion = _FUSION.match(k)
        if k.startswith("extra_"):
            streams[1][k[len("extra_"):]] = value
        elif k.startswith(_RGB_PARTS):
            streams[0][k] = value
        elif fusion:
            part = "frm" if fusion.group(1) == "FRMs" else "ffm"
            out[f"fusion.{part}.{fusion.group(2)}.{fusion.group(3)}"] = value
        elif not k.startswith("decode_head."):
            unknown.append(key)
    for i, stream in enumerate(streams):
        converted, not_mit, _heads = convert_mit_state_dict(stream)
        out.update({f"encoders.{i}.{k}": v for k, v in converted.items()})
        unknown += not_mit
    decoder, classifier = convert_segformer_head(raw)
    out.update({f"decoder.{k}": v for k, v in decoder.items()})
    out.update({f"head.1.{k}": v for k, v in classifier.items()})
    return out, unknown


def load_cmx_official(model: CMX, raw: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, list[str]]:
    """Load a whole official CMX checkpoint into `model`; refuse, naming the key to change, what does not fit."""
    state, unknown = convert_cmx_state_dict(raw)
    if unknown:
        raise CheckpointError(f"{path} has keys of no known CMX part ({unknown[:4]}); only official CMX checkpoints "
                              "with a MiT backbone and the MLPDecoder (C.decoder='MLPDecoder') load.")
    if not any(k.startswith("decoder.") for k in state):
        raise CheckpointError(f"{path} has no MLPDecoder head (decode_head.linear_c*); only official CMX checkpoints "
                              "with the MLPDecoder load.")
    variant = mit_variant_of({k[len("encoders.0."):]: v for k, v in state.items() if k.startswith("encoders.0.")})
    if variant != model.backbone:
        raise CheckpointError(f"{path} is a CMX {variant or 'model of an unknown MiT variant'} but "
                              f"model.backbone={model.backbone}; set model.backbone={variant}.")
    fused = sorted({int(k.split(".")[2]) for k in state if k.startswith("fusion.")})
    if fused != model.fused_stages:
        raise CheckpointError(f"{path} rectifies and fuses stages {fused} but fusion.stages selects "
                              f"{model.fused_stages}; set fusion.stages=null to use the checkpoint.")
    own = model.state_dict()
    adapted = []
    for i, encoder in enumerate(model.encoders):
        key = f"encoders.{i}.stages.0.embed.proj.weight"
        if state[key].shape[1] != encoder.in_chans:
            state[key] = adapt_input_weight(state[key], encoder.in_chans)
            adapted.append(key)
        if encoder.auto_eps:
            encoder.set_block_norm_eps(SOURCE_EPS["nvlabs"])  # the official MiT's LayerNorms
    classifier = [k for k in ("head.1.weight", "head.1.bias") if k in state and state[k].shape != own[k].shape]
    for k in classifier:
        state.pop(k)
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path} does not fit this CMX ({len(bad)} shape mismatches, e.g. {bad[0]}); the "
                              "official decoder is 512 wide: set model.decoder_embed_dim=512.")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked") and k not in classifier]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit this CMX (missing {missing[:4]}, unexpected "
                              f"{list(result.unexpected_keys)[:4]}); check model.backbone and fusion.stages.")
    if classifier:
        log.info("loaded official CMX %s from %s, all but the classifier (%d classes; this model predicts %d): the "
                 "classifier starts from its initialisation", variant, path, raw_classes(raw), model.num_classes)
    else:
        log.info("loaded official CMX %s from %s: both streams, FRMs, FFMs, decoder and classifier%s", variant, path,
                 f" (first convs adapted: {adapted})" if adapted else "")
    return {"missing": [], "unexpected": [], "adapted": adapted, "skipped": classifier}


def raw_classes(raw: Mapping[str, torch.Tensor]) -> int | str:
    _decoder, classifier = convert_segformer_head(raw)
    return int(classifier["weight"].shape[0]) if "weight" in classifier else "?"
