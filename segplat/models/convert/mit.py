"""MiT (SegFormer encoder) checkpoints from transformers, NVlabs/mmseg 0.x, CMX or segplat -> `MixVisionTransformer`.

Sources and their names (one table converts them all, the names do not collide):
- transformers v5 (`stages.{s}.blocks.{b}.attention.q_proj`, `.patch_embeddings`, `.layer_norm`) and v4
  (`encoder.block.{s}.{b}.attention.self.query`, `encoder.patch_embeddings.{s}`, `encoder.layer_norm.{s}`),
  optionally under `segformer.`;
- NVlabs / mmseg 0.x / CMX (`block{s+1}.{b}.attn.q`, `patch_embed{s+1}`, `norm{s+1}`), optionally under
  `backbone.` or `module.`;
- segplat (`stages.{s}.blocks.{b}.attn.q`, optionally under `encoder.`).
Separate key and value projections are merged into our fused `kv`. Heads of the checkpoints' own tasks
(`decode_head.`, `head.`, ...) are set aside for the model that owns a head (see `segformer_head`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segplat.errors import CheckpointError, ConfigError
from segplat.models.weights import adapt_input_weight, load_state_file

if TYPE_CHECKING:
    from segplat.models.encoders.mit import MixVisionTransformer

log = logging.getLogger(__name__)

#: block/stage LayerNorm eps each source's code uses (the patch-embedding and reduction norms are 1e-5 in all)
SOURCE_EPS = {"transformers": 1e-5, "nvlabs": 1e-6, "segplat": 1e-6}

# Block sub-module names of each source (transformers v5, transformers v4, NVlabs/mmseg, ours) -> ours.
_BLOCK_NAMES: dict[str, str] = {
    "layernorm_before": "norm1", "layer_norm_1": "norm1", "norm1": "norm1",
    "layernorm_after": "norm2", "layer_norm_2": "norm2", "norm2": "norm2",
    "attention.q_proj": "attn.q", "attention.self.query": "attn.q", "attn.q": "attn.q",
    "attention.k_proj": "attn.k", "attention.self.key": "attn.k",
    "attention.v_proj": "attn.v", "attention.self.value": "attn.v",
    "attn.kv": "attn.kv",
    "attention.sequence_reduction.sequence_reduction": "attn.sr", "attention.self.sr": "attn.sr",
    "attn.sr": "attn.sr",
    "attention.sequence_reduction.layer_norm": "attn.sr_norm", "attention.self.layer_norm": "attn.sr_norm",
    "attn.norm": "attn.sr_norm", "attn.sr_norm": "attn.sr_norm",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj", "attn.proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.dense1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "mlp.dense2": "mlp.fc2",
    "mlp.dwconv.dwconv": "mlp.dwconv", "mlp.dwconv": "mlp.dwconv",
}
_EMBED_NAMES: dict[str, str] = {"proj": "proj", "layer_norm": "norm", "norm": "norm"}

# (pattern, kind, first stage number): groups are (stage, [block,] rest); NVlabs counts stages from 1
_LAYOUTS: list[tuple[re.Pattern[str], str, int]] = [
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$"), "block", 0),          # ours, transformers v5
    (re.compile(r"^encoder\.block\.(\d+)\.(\d+)\.(.+)$"), "block", 0),          # transformers v4
    (re.compile(r"^block(\d+)\.(\d+)\.(.+)$"), "block", 1),                     # NVlabs / mmseg
    (re.compile(r"^stages\.(\d+)\.(?:embed|patch_embeddings)\.(.+)$"), "embed", 0),
    (re.compile(r"^encoder\.patch_embeddings\.(\d+)\.(.+)$"), "embed", 0),
    (re.compile(r"^patch_embed(\d+)\.(.+)$"), "embed", 1),
    (re.compile(r"^stages\.(\d+)\.(?:norm|layer_norm)\.(.+)$"), "norm", 0),
    (re.compile(r"^encoder\.layer_norm\.(\d+)\.(.+)$"), "norm", 0),
    (re.compile(r"^norm(\d+)\.(.+)$"), "norm", 1),
]
WRAPPER_PREFIXES = ("module.", "backbone.", "segformer.", "model.")
# heads of the checkpoints' own tasks (and a segplat SegFormer's decoder): expected in the file, not the encoder's
HEAD_PREFIXES = ("decode_head.", "auxiliary_head.", "head.", "classifier.", "decoder.")

_TRANSFORMERS_MARKERS = re.compile(
    r"(^|\.)(encoder\.block\.|encoder\.patch_embeddings\.|stages\.\d+\.patch_embeddings\.)")
_NVLABS_MARKERS = re.compile(r"(^|\.)(block\d+\.\d+\.|patch_embed\d+\.)")


def strip_wrappers(key: str) -> str:
    """Drop DDP/framework wrapper prefixes (`module.`, `backbone.`, `segformer.`, `model.`), repeatedly."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        if key.startswith("encoder.stages."):  # a segplat SegFormer/Segmenter state dict
            key, changed = key[len("encoder."):], True
    return key


def checkpoint_source(keys: Sequence[str]) -> str:
    """Which code saved a state dict: "transformers", "nvlabs" (also mmseg, CMX) or "segplat"."""
    if any(_TRANSFORMERS_MARKERS.search(k) for k in keys):
        return "transformers"
    if any(_NVLABS_MARKERS.search(k) for k in keys):
        return "nvlabs"
    return "segplat"


def _split_param(rest: str) -> tuple[str, str]:
    module, _, param = rest.rpartition(".")
    return module, param


def _convert_key(k: str) -> str | None:
    for pattern, kind, base in _LAYOUTS:
        m = pattern.match(k)
        if not m:
            continue
        stage = int(m.group(1)) - base
        if kind == "block":
            module, param = _split_param(m.group(3))
            name = _BLOCK_NAMES.get(module)
            return None if name is None else f"stages.{stage}.blocks.{m.group(2)}.{name}.{param}"
        if kind == "embed":
            module, param = _split_param(m.group(2))
            name = _EMBED_NAMES.get(module)
            return None if name is None else f"stages.{stage}.embed.{name}.{param}"
        return f"stages.{stage}.norm.{m.group(2)}" if m.group(2) in ("weight", "bias") else None
    return None


def convert_mit_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str],
                                                                         list[str]]:
    """Any known SegFormer/MiT key layout -> ours. Returns (converted, unrecognised keys, head keys set aside)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    heads: list[str] = []
    pending_kv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = strip_wrappers(key)
        if k.startswith(HEAD_PREFIXES):
            heads.append(key)
            continue
        new = _convert_key(k)
        if new is None:
            unknown.append(key)
        elif new.split(".")[-2] in ("k", "v") and ".attn." in new:
            base_key, part = new.rsplit(".", 2)[0], new.split(".")[-2:]
            pending_kv.setdefault(f"{base_key}.kv.{part[1]}", {})[part[0]] = value
        else:
            out[new] = value
    for key, parts in pending_kv.items():
        if set(parts) == {"k", "v"}:
            out[key] = torch.cat([parts["k"], parts["v"]], dim=0)
        else:
            unknown.append(f"{key} (only {''.join(parts)})")
    return out, unknown, heads


def mit_variant_of(state: Mapping[str, torch.Tensor]) -> str | None:
    """The MiT variant (mit_b0 … mit_b5) whose dims and depths a converted encoder state has, if any."""
    from segplat.models.encoders.mit import MIT_SETTINGS

    dims, depths = [], []
    for s in range(4):
        weight = state.get(f"stages.{s}.embed.proj.weight")
        if weight is None:
            return None
        dims.append(int(weight.shape[0]))
        depths.append(len({k.split(".")[3] for k in state if k.startswith(f"stages.{s}.blocks.")}))
    for name, (d, n) in MIT_SETTINGS.items():
        if tuple(dims) == d and tuple(depths) == n:
            return name
    return None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, or from a `save_pretrained` folder (single or sharded)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = p / index_name
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                state: dict[str, torch.Tensor] = {}
                for shard in shards:
                    state.update(load_state_file(p / shard))
                return state
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"):
            if (p / name).is_file():
                return load_state_file(p / name)
        raise ConfigError(f"pretrained={path} is a folder without model.safetensors or pytorch_model.bin; point it "
                          "at a save_pretrained folder or a weights file.")
    return load_state_file(p)


def load_mit_weights(model: MixVisionTransformer, path: str | Path,
                     raw: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Convert, adapt the first conv to `model.in_chans`, check shapes and load non-strictly; log the report.

    `raw` is the file's state dict when the caller has read it already (a model that also loads a head).
    """
    raw = read_weights(path) if raw is None else raw
    state, unknown, heads = convert_mit_state_dict(raw)
    if not state:
        raise CheckpointError(f"pretrained={path} holds no MiT/SegFormer encoder weights (first keys: "
                              f"{list(raw)[:3]}); point it at a SegFormer or MiT checkpoint.")
    own = model.state_dict()
    first = "stages.0.embed.proj.weight"
    adapted = []
    if first in state and state[first].shape[1] != model.in_chans:
        state[first] = adapt_input_weight(state[first], model.in_chans)
        adapted.append(first)
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        variant = mit_variant_of(state)
        hint = f"it holds {variant}: set the backbone to {variant}" if variant else \
            "use the checkpoint of the same MiT variant"
        raise CheckpointError(f"pretrained={path} does not fit {model.name} ({len(bad)} shape mismatches, e.g. "
                              f"{bad[0]}); {hint}.")
    source = checkpoint_source(list(raw))
    if model.auto_eps:
        model.set_block_norm_eps(SOURCE_EPS[source])
    result = model.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys) + unknown,
              "ignored_heads": heads, "adapted": adapted}
    loaded = len(state) - len(result.unexpected_keys)
    log.info("%s: loaded %d tensors from %s (saved by %s; %d head tensors not part of the encoder%s)", model.name,
             loaded, path, source, len(heads), f", first conv adapted to {model.in_chans} channels" if adapted else "")
    if report["missing"]:
        log.warning("%s: %d keys missing from %s: %s", model.name, len(report["missing"]), path,
                    report["missing"][:8])
    if report["unexpected"]:
        log.warning("%s: %d unexpected keys in %s: %s", model.name, len(report["unexpected"]), path,
                    report["unexpected"][:8])
    return report


def to_nvlabs_state_dict(model: MixVisionTransformer) -> dict[str, torch.Tensor]:
    """Our weights under the NVlabs/mmseg key names (for exchanging weights with that code)."""
    inverse_block = {"norm1": "norm1", "norm2": "norm2", "attn.q": "attn.q", "attn.kv": "attn.kv", "attn.sr": "attn.sr",
                     "attn.sr_norm": "attn.norm", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1",
                     "mlp.fc2": "mlp.fc2", "mlp.dwconv": "mlp.dwconv.dwconv"}
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        stage = int(parts[1]) + 1
        if parts[2] == "blocks":
            module, param = _split_param(".".join(parts[4:]))
            out[f"block{stage}.{parts[3]}.{inverse_block[module]}.{param}"] = value
        elif parts[2] == "embed":
            out[f"patch_embed{stage}.{'.'.join(parts[3:])}"] = value
        else:
            out[f"norm{stage}.{parts[-1]}"] = value
    return out
