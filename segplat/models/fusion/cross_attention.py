"""Cross-attention fusion: visual queries attend over auxiliary-stream keys/values (multi-head).

Both streams cover the same ground at different resolutions, so the air tokens are *not* resampled to the
visual grid: each token gets a Fourier embedding of its cell centre in normalised ground coordinates
((i + 0.5) / H, (j + 0.5) / W), and one shared projection of it is added to the queries and the keys. A
visual pixel and the air cell above it thus carry the same positional code whatever the two resolutions
are, and attention can learn locality (or long-range transport) instead of being permutation-blind.
Air maps larger than the visual map are area-pooled to its size first, bounding the cost at (HW)^2.

    out = v + proj(MHA(q = Wq LN(v) + P(pos_v), k = Wk LN(a) + P(pos_a), val = Wv LN(a)))

`proj` is zero-initialised, so at initialisation out = v exactly: training starts from the vision stream
unchanged and the attention path grows from there (its gradient is non-zero since MHA's output is).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.fusion.film_gate import resample_to


def default_heads(dim: int, head_dim: int = 64) -> int:
    """The largest head count <= dim // head_dim that divides dim (MiT's 320 -> 5, 512 -> 8)."""
    for h in range(max(1, dim // head_dim), 0, -1):
        if dim % h == 0:
            return h
    return 1


def coord_features(h: int, w: int, num_freqs: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h*w, 4*num_freqs) sin/cos features of the cell centres in [0, 1]^2, row-major like the tokens."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # (hw, 2)
    freqs = math.pi * (2.0 ** torch.arange(num_freqs, device=device, dtype=torch.float32))
    angles = grid[:, :, None] * freqs  # (hw, 2, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(h * w, -1).to(dtype)


class CrossAttentionFusion(nn.Module):
    """Fuses (vision, aux) at one stage; returns a map shaped like the vision map."""

    def __init__(self, vis_channels: int, aux_channels: int, heads: int | None = None, num_freqs: int = 8,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        heads = heads or default_heads(vis_channels)
        if vis_channels % heads:
            raise ConfigError(f"cross-attention heads={heads} must divide the vision stage's {vis_channels} "
                              "channels; choose a divisor.")
        self.heads = heads
        self.num_freqs = num_freqs
        self.attn_drop = attn_drop
        self.norm_q = nn.LayerNorm(vis_channels, eps=1e-6)
        self.norm_kv = nn.LayerNorm(aux_channels, eps=1e-6)
        self.q = nn.Linear(vis_channels, vis_channels)
        self.k = nn.Linear(aux_channels, vis_channels)
        self.v = nn.Linear(aux_channels, vis_channels)
        self.pos = nn.Linear(4 * num_freqs, vis_channels)
        self.proj = nn.Linear(vis_channels, vis_channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, vis: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        b, c, h, w = vis.shape
        if aux.shape[-2] > h or aux.shape[-1] > w:
            aux = resample_to(aux, (min(h, aux.shape[-2]), min(w, aux.shape[-1])))
        ha, wa = aux.shape[-2:]
        vt = vis.flatten(2).transpose(1, 2)  # (B, HW, C)
        at = aux.flatten(2).transpose(1, 2)  # (B, hw, Ca)
        pos_q = self.pos(coord_features(h, w, self.num_freqs, vis.device, vis.dtype))
        pos_k = self.pos(coord_features(ha, wa, self.num_freqs, vis.device, vis.dtype))
        kv_in = self.norm_kv(at)
        q = self.q(self.norm_q(vt)) + pos_q
        k = self.k(kv_in) + pos_k
        v = self.v(kv_in)
        d = c // self.heads
        q, k, v = (t.reshape(b, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return vis + out.transpose(1, 2).reshape(b, c, h, w)
