"""Mix Transformer (MiT-B0…B5), the SegFormer encoder, with loaders for the checkpoints people actually have.

Architecture (Xie et al., "SegFormer", NeurIPS 2021, and the NVlabs code): four stages, each an
overlapping patch embedding (conv 7/stride 4, then 3/stride 2), blocks of efficient self-attention
(keys/values spatially reduced by a strided conv, ratios 8/4/2/1) and a Mix-FFN (linear, depth-wise
3x3 conv, GELU, linear; expansion 4), then a LayerNorm. No position embedding: the depth-wise conv
carries position, so any input size works. Stochastic depth grows linearly over all blocks.

LayerNorm eps follows the NVlabs code: 1e-6 in the blocks and after each stage, the PyTorch default
1e-5 in the patch embeddings and the key/value reduction. `transformers` uses 1e-5 everywhere. With
`norm_eps=None` (the default) the block/stage eps is 1e-6, switched to 1e-5 when weights from a
`transformers` checkpoint are loaded, so that a checkpoint gives the features of the implementation
it was saved by; an explicit `norm_eps` is never changed.

`pretrained` is a local file or folder (runs never download) holding weights saved by
`transformers` (SegformerModel / SegformerForSemanticSegmentation, v4 or v5 key names; .bin, .pt,
.safetensors or a `save_pretrained` folder), by NVlabs/mmseg (`patch_embed1.proj.weight`,
`block1.0.attn.q.weight`, optionally under `backbone.`), or by this module. Keys are converted,
keys/values merged into our fused `kv` projection, the first conv adapted to `in_chans`, and missing
or unexpected keys logged (and kept in `load_report`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import CheckpointError, ConfigError
from segplat.models.weights import adapt_input_weight, load_state_file

log = logging.getLogger(__name__)

NVLABS_EPS = 1e-6  # block and stage LayerNorms in the NVlabs code (and the published weights' training)
TRANSFORMERS_EPS = 1e-5  # transformers' SegFormer uses the PyTorch default everywhere

#: variant -> (embed dims, depths); heads 1/2/5/8, sr ratios 8/4/2/1 and mlp ratio 4 are shared
MIT_SETTINGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (kernel > stride), then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride, padding=patch // 2)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5 as in the reference code

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a `sr`-times smaller map."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"MiT: embed dim {dim} is not divisible by {heads} heads.")
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # keys and values in one matmul
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)  # eps 1e-5 as in the reference code

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).view(b, n, self.heads, d).transpose(1, 2)
        if self.sr_ratio > 1:
            # (B, N, C) read as an NHWC map without a copy; the conv accepts the strided view
            y = self.sr(x.view(b, h, w, c).permute(0, 3, 1, 2))
            y = self.sr_norm(y.flatten(2).transpose(1, 2))
        else:
            y = x
        k, v = self.kv(y).view(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class MixFFN(nn.Module):
    """Linear -> depth-wise 3x3 conv -> GELU -> linear; the conv stands in for position embeddings."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.fc1(x)
        c = x.shape[-1]
        x = self.dwconv(x.view(b, h, w, c).permute(0, 3, 1, 2))
        x = F.gelu(x.permute(0, 2, 3, 1).reshape(b, n, c))
        return self.drop(self.fc2(self.drop(x)))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: float, drop_path_rate: float,
                 drop: float, attn_drop: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EfficientAttention(dim, heads, sr_ratio, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)
        self.drop_path = drop_path_rate

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path, self.training)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path:.3f}"


class MiTStage(nn.Module):
    """Patch embedding + blocks + norm; maps (B, C_in, H, W) to (B, C, H/s, W/s). CMX calls stages one by one."""

    def __init__(self, in_chans: int, dim: int, depth: int, heads: int, sr_ratio: int, patch: int, stride: int,
                 mlp_ratio: float, drop_paths: Sequence[float], drop: float, attn_drop: float,
                 norm_eps: float) -> None:
        super().__init__()
        self.embed = OverlapPatchEmbed(in_chans, dim, patch, stride)
        self.blocks = nn.ModuleList(MiTBlock(dim, heads, sr_ratio, mlp_ratio, drop_paths[i], drop, attn_drop,
                                             norm_eps) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.embed(x)
        for block in self.blocks:
            x = block(x, h, w)
        x = self.norm(x)
        return x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class MixVisionTransformer(nn.Module):
    """MiT encoder: `forward(x)` returns the four stage maps at strides 4/8/16/32 (finest first).

    `out_channels` and `reductions` describe that pyramid for decoders and the generic Segmenter.
    """

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], in_chans: int = 3,
                 num_heads: Sequence[int] = (1, 2, 5, 8), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, norm_eps: float | None = None,
                 pretrained: str | Path | None = None, name: str = "mit") -> None:
        super().__init__()
        if in_chans < 1:
            raise ConfigError(f"{name}: in_chans={in_chans} must be at least 1.")
        self.name = name
        self.in_chans = in_chans
        self.auto_eps = norm_eps is None
        norm_eps = NVLABS_EPS if norm_eps is None else norm_eps
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, cin, start = [], in_chans, 0
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            stages.append(MiTStage(cin, dim, depth, num_heads[i], sr_ratios[i], 7 if i == 0 else 3,
                                   4 if i == 0 else 2, mlp_ratio, rates[start:start + depth], drop_rate,
                                   attn_drop_rate, norm_eps))
            cin, start = dim, start + depth
        self.stages = nn.ModuleList(stages)
        self.out_channels: list[int] = list(embed_dims)
        self.reductions: list[int] = [4 * 2 ** i for i in range(len(embed_dims))]
        self.apply(init_mit_weights)
        self.load_report: dict[str, list[str]] | None = None
        if pretrained:
            self.load_pretrained(pretrained)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        """Load a SegFormer/MiT checkpoint from a local file or folder; see the module docstring."""
        report = load_mit_weights(self, path)
        self.load_report = report
        return report


def init_mit_weights(m: nn.Module) -> None:
    """The NVlabs initialisation: truncated normal linears, fan-out normal convs, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------- weights

# Block sub-module names of each source (transformers v5, transformers v4, NVlabs/mmseg, ours) -> ours.
# The names do not collide across sources, so one table converts any of them.
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

# (pattern, kind): groups are (stage, [block,] rest); NVlabs counts stages from 1
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
_PREFIXES = ("module.", "backbone.", "segformer.", "model.")
# heads of the checkpoints' own tasks (and a segplat SegFormer's decoder): expected in the file, not the encoder's
_HEAD_PREFIXES = ("decode_head.", "auxiliary_head.", "head.", "classifier.", "decoder.")


def _split_param(rest: str) -> tuple[str, str]:
    module, _, param = rest.rpartition(".")
    return module, param


_TRANSFORMERS_MARKERS = re.compile(
    r"(^|\.)(encoder\.block\.|encoder\.patch_embeddings\.|stages\.\d+\.patch_embeddings\.)")
_NVLABS_MARKERS = re.compile(r"(^|\.)(block\d+\.\d+\.|patch_embed\d+\.)")


def checkpoint_source(keys: Sequence[str]) -> str:
    """Which code saved a state dict: "transformers", "nvlabs" (also mmseg, CMX) or "segplat"."""
    if any(_TRANSFORMERS_MARKERS.search(k) for k in keys):
        return "transformers"
    if any(_NVLABS_MARKERS.search(k) for k in keys):
        return "nvlabs"
    return "segplat"


def convert_mit_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str],
                                                                         list[str]]:
    """Any known SegFormer/MiT key layout -> ours. Returns (converted, unrecognised keys, ignored head keys)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    heads: list[str] = []
    pending_kv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
            if k.startswith("encoder.stages."):  # a segplat SegFormer/Segmenter state dict
                k, changed = k[len("encoder."):], True
        if k.startswith(_HEAD_PREFIXES):
            heads.append(key)
            continue
        new = None
        for pattern, kind, base in _LAYOUTS:
            m = pattern.match(k)
            if not m:
                continue
            stage = int(m.group(1)) - base
            if kind == "block":
                module, param = _split_param(m.group(3))
                name = _BLOCK_NAMES.get(module)
                if name is not None:
                    new = f"stages.{stage}.blocks.{m.group(2)}.{name}.{param}"
            elif kind == "embed":
                module, param = _split_param(m.group(2))
                name = _EMBED_NAMES.get(module)
                if name is not None:
                    new = f"stages.{stage}.embed.{name}.{param}"
            elif m.group(2) in ("weight", "bias"):
                new = f"stages.{stage}.norm.{m.group(2)}"
            break
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


def load_mit_weights(model: MixVisionTransformer, path: str | Path) -> dict[str, list[str]]:
    """Convert, adapt the first conv to `model.in_chans`, check shapes and load non-strictly; log the report."""
    raw = read_weights(path)
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
        raise CheckpointError(f"pretrained={path} does not fit {model.name} ({len(bad)} shape mismatches, e.g. "
                              f"{bad[0]}); use the checkpoint of the same MiT variant.")
    source = checkpoint_source(list(raw))
    if model.auto_eps:
        set_block_norm_eps(model, TRANSFORMERS_EPS if source == "transformers" else NVLABS_EPS)
    result = model.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys) + unknown,
              "ignored_heads": heads, "adapted": adapted}
    loaded = len(state) - len(result.unexpected_keys)
    log.info("%s: loaded %d tensors from %s (saved by %s; %d head tensors ignored%s)", model.name, loaded, path,
             source, len(heads), f", first conv adapted to {model.in_chans} channels" if adapted else "")
    if report["missing"]:
        log.warning("%s: %d keys missing from %s: %s", model.name, len(report["missing"]), path,
                    report["missing"][:8])
    if report["unexpected"]:
        log.warning("%s: %d unexpected keys in %s: %s", model.name, len(report["unexpected"]), path,
                    report["unexpected"][:8])
    return report


def set_block_norm_eps(model: MixVisionTransformer, eps: float) -> None:
    """Set the eps of the block and stage LayerNorms (not the embedding / reduction ones, 1e-5 in every source)."""
    for stage in model.stages:
        stage.norm.eps = eps
        for block in stage.blocks:
            block.norm1.eps = block.norm2.eps = eps


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


# --------------------------------------------------------------------------------------------- factories

def build_mit(name: str, in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: float = 0.1,
              **kwargs: Any) -> MixVisionTransformer:
    """MiT by variant name (`mit_b0` … `mit_b5`); a wrong name is refused listing the valid ones."""
    key = str(name).lower().replace("-", "_")
    if key not in MIT_SETTINGS:
        raise ConfigError(f"backbone={name!r} is not a MiT variant; valid: {', '.join(MIT_SETTINGS)}.")
    dims, depths = MIT_SETTINGS[key]
    return MixVisionTransformer(dims, depths, in_chans=in_chans, drop_path_rate=drop_path_rate,
                                pretrained=pretrained, name=key, **kwargs)


def mit_b0(in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: float = 0.1,
           **kwargs: Any) -> MixVisionTransformer:
    return build_mit("mit_b0", in_chans, pretrained, drop_path_rate, **kwargs)


def mit_b1(in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: float = 0.1,
           **kwargs: Any) -> MixVisionTransformer:
    return build_mit("mit_b1", in_chans, pretrained, drop_path_rate, **kwargs)


def mit_b2(in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: float = 0.1,
           **kwargs: Any) -> MixVisionTransformer:
    return build_mit("mit_b2", in_chans, pretrained, drop_path_rate, **kwargs)


def mit_b3(in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: float = 0.1,
           **kwargs: Any) -> MixVisionTransformer:
    return build_mit("mit_b3", in_chans, pretrained, drop_path_rate, **kwargs)


def mit_b4(in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: float = 0.1,
           **kwargs: Any) -> MixVisionTransformer:
    return build_mit("mit_b4", in_chans, pretrained, drop_path_rate, **kwargs)


def mit_b5(in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: float = 0.1,
           **kwargs: Any) -> MixVisionTransformer:
    return build_mit("mit_b5", in_chans, pretrained, drop_path_rate, **kwargs)
