"""CMX's fusion modules (Zhang et al., "CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with
Transformers", T-ITS 2023), written after the paper and the official RGBX_Semantic_Segmentation code.

- `FeatureRectifyModule` (FRM), after each stage, for both streams: channel weights from an MLP
  over the avg- and max-pooled concatenation, spatial weights from 1x1 convs over the
  concatenation; each stream adds the *other* stream scaled by both weights (λc = λs = 0.5). The
  rectified maps continue through the next stage.
- `FeatureFusionModule` (FFM), per stage: (1) cross-path information exchange: each stream is
  linearly embedded and split into a residual half and an attention half; the attention half forms
  a global context per head, softmax(kᵀv·scale) over the key channels (efficient attention, cost
  linear in pixels), and each stream's queries read the *other* stream's context; a linear layer
  and LayerNorm close a residual; (2) channel embedding of the concatenated streams: 1x1 conv,
  depth-wise 3x3 conv, ReLU, 1x1 conv, BatchNorm, plus a 1x1 residual projection, then BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from segplat.models.encoders.mit import init_mit_weights

# CMX initialises its fusion modules as MiT does (the official code shares the function)
init_cmx_weights = init_mit_weights


class ChannelWeights(nn.Module):
    """Per-stream channel weights (2, B, C, 1, 1) from pooled statistics of both streams."""

    def __init__(self, dim: int, reduction: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(4 * dim, 4 * dim // reduction), nn.ReLU(inplace=True),
                                 nn.Linear(4 * dim // reduction, 2 * dim), nn.Sigmoid())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x1, x2], dim=1)
        y = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (B, 4C): avg then max
        return self.mlp(y).view(x.shape[0], 2, self.dim, 1, 1).transpose(0, 1)


class SpatialWeights(nn.Module):
    """Per-stream spatial weights (2, B, 1, H, W) from 1x1 convs over both streams."""

    def __init__(self, dim: int, reduction: int = 1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(2 * dim, dim // reduction, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(dim // reduction, 2, 1), nn.Sigmoid())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x1.shape
        return self.mlp(torch.cat([x1, x2], dim=1)).view(b, 2, 1, h, w).transpose(0, 1)


class FeatureRectifyModule(nn.Module):
    """FRM: each stream is corrected with the other's channel- and spatially-weighted features."""

    def __init__(self, dim: int, reduction: int = 1, lambda_c: float = 0.5, lambda_s: float = 0.5) -> None:
        super().__init__()
        self.lambda_c = lambda_c
        self.lambda_s = lambda_s
        self.channel_weights = ChannelWeights(dim, reduction)
        self.spatial_weights = SpatialWeights(dim, reduction)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cw = self.channel_weights(x1, x2)
        sw = self.spatial_weights(x1, x2)
        # as in the official code, stream 1 is rectified by stream 2 under the second weight set and vice versa
        out1 = x1 + self.lambda_c * cw[1] * x2 + self.lambda_s * sw[1] * x2
        out2 = x2 + self.lambda_c * cw[0] * x1 + self.lambda_s * sw[0] * x1
        return out1, out2


class CrossAttention(nn.Module):
    """Efficient cross attention: per stream a global context softmax(kᵀv·scale) (d x d per head),
    applied to the other stream's queries (the features themselves, as in CMX)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"FFM: dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.kv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.kv2 = nn.Linear(dim, 2 * dim, bias=False)

    def _context(self, x: torch.Tensor, kv: nn.Linear) -> torch.Tensor:
        b, n, c = x.shape
        k, v = kv(x).view(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return (k.transpose(-2, -1) @ v * self.scale).softmax(dim=-2)  # (B, heads, d, d)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x1.shape
        q1 = x1.view(b, n, self.heads, c // self.heads).transpose(1, 2)
        q2 = x2.view(b, n, self.heads, c // self.heads).transpose(1, 2)
        ctx1, ctx2 = self._context(x1, self.kv1), self._context(x2, self.kv2)
        y1 = (q1 @ ctx2).transpose(1, 2).reshape(b, n, c)
        y2 = (q2 @ ctx1).transpose(1, 2).reshape(b, n, c)
        return y1, y2


class CrossPath(nn.Module):
    """Stage 1 of the FFM: embed, split into (kept, attended) halves, cross-attend, project back, residual + LN."""

    def __init__(self, dim: int, heads: int, reduction: int = 1) -> None:
        super().__init__()
        inner = dim // reduction
        self.channel_proj1 = nn.Linear(dim, 2 * inner)
        self.channel_proj2 = nn.Linear(dim, 2 * inner)
        self.cross_attn = CrossAttention(inner, heads)
        self.end_proj1 = nn.Linear(2 * inner, dim)
        self.end_proj2 = nn.Linear(2 * inner, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1, u1 = torch.relu(self.channel_proj1(x1)).chunk(2, dim=-1)
        y2, u2 = torch.relu(self.channel_proj2(x2)).chunk(2, dim=-1)
        v1, v2 = self.cross_attn(u1.contiguous(), u2.contiguous())
        out1 = self.norm1(x1 + self.end_proj1(torch.cat([y1, v1], dim=-1)))
        out2 = self.norm2(x2 + self.end_proj2(torch.cat([y2, v2], dim=-1)))
        return out1, out2


class ChannelEmbed(nn.Module):
    """Stage 2 of the FFM: the concatenated streams (2C) to C through convs, with a 1x1 residual."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 1) -> None:
        super().__init__()
        inner = out_channels // reduction
        self.residual = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.channel_embed = nn.Sequential(
            nn.Conv2d(in_channels, inner, 1),
            nn.Conv2d(inner, inner, 3, padding=1, groups=inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.residual(x) + self.channel_embed(x))


class FeatureFusionModule(nn.Module):
    """FFM: two (B, C, H, W) maps -> one fused (B, C, H, W) map for the decoder."""

    def __init__(self, dim: int, heads: int, reduction: int = 1) -> None:
        super().__init__()
        self.cross = CrossPath(dim, heads, reduction)
        self.channel_emb = ChannelEmbed(2 * dim, dim, reduction)
        self.apply(init_cmx_weights)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x1.shape
        t1, t2 = self.cross(x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2))
        merged = torch.cat([t1, t2], dim=-1).transpose(1, 2).reshape(b, 2 * c, h, w)
        return self.channel_emb(merged)
