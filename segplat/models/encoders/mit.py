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
`block1.0.attn.q.weight`, optionally under `backbone.`), or by this module. `segplat.models.convert.mit`
converts the keys and merges keys/values into our fused `kv` projection; the first conv is adapted to
`in_chans`, and missing or unexpected keys are logged (and kept in `load_report`). The variants are one
table (`MIT_SETTINGS`); `mit_b0` … `mit_b5` are its named factories.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from timm.layers import DropPath
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.convert.mit import SOURCE_EPS, load_mit_weights
from segplat.schema import OpenFraction, PositiveFloat

NVLABS_EPS = SOURCE_EPS["nvlabs"]  # block and stage LayerNorms in the NVlabs code (and its published weights)

#: variant -> (embed dims, depths); heads 1/2/5/8, sr ratios 8/4/2/1 and mlp ratio 4 are shared
MIT_SETTINGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
MiTName = Literal["mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"]  # a config's `backbone`


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
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


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

    def load_pretrained(self, path: str | Path, raw: dict[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
        """Load a SegFormer/MiT checkpoint from a local file or folder (`raw`: its state dict, if read already)."""
        report = load_mit_weights(self, path, raw)
        self.load_report = report
        return report

    def set_block_norm_eps(self, eps: float) -> None:
        """Set the eps of the block and stage LayerNorms (not the embedding / reduction ones, 1e-5 in every source)."""
        for stage in self.stages:
            stage.norm.eps = eps
            for block in stage.blocks:
                block.norm1.eps = block.norm2.eps = eps


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


# --------------------------------------------------------------------------------------------- factories

def build_mit(name: MiTName, in_chans: int = 3, pretrained: str | Path | None = None,
              drop_path_rate: OpenFraction = 0.1, drop_rate: OpenFraction = 0.0, attn_drop_rate: OpenFraction = 0.0,
              mlp_ratio: PositiveFloat = 4.0, norm_eps: PositiveFloat | None = None) -> MixVisionTransformer:
    """MiT by variant name (`mit_b0` … `mit_b5`, as `MiTName` types a config's `backbone`; `MiT-B2` is read as
    `mit_b2`)."""
    key = str(name).lower().replace("-", "_")
    dims, depths = MIT_SETTINGS[key]
    return MixVisionTransformer(dims, depths, in_chans=in_chans, drop_path_rate=drop_path_rate, drop_rate=drop_rate,
                                attn_drop_rate=attn_drop_rate, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                                pretrained=pretrained, name=key)


def _variant(name: str) -> Callable[..., MixVisionTransformer]:
    """A named factory for one MiT variant (the config files' `_target_: segplat.models.encoders.mit.mit_b1`); its
    signature is the schema of such a node."""

    def build(in_chans: int = 3, pretrained: str | Path | None = None, drop_path_rate: OpenFraction = 0.1,
              drop_rate: OpenFraction = 0.0, attn_drop_rate: OpenFraction = 0.0, mlp_ratio: PositiveFloat = 4.0,
              norm_eps: PositiveFloat | None = None) -> MixVisionTransformer:
        return build_mit(name, in_chans, pretrained, drop_path_rate, drop_rate, attn_drop_rate, mlp_ratio, norm_eps)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"MiT-{name[-2:].upper()} (dims, depths = {MIT_SETTINGS[name]}); see `build_mit`."
    return build


mit_b0 = _variant("mit_b0")
mit_b1 = _variant("mit_b1")
mit_b2 = _variant("mit_b2")
mit_b3 = _variant("mit_b3")
mit_b4 = _variant("mit_b4")
mit_b5 = _variant("mit_b5")
