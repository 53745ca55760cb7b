"""Building blocks for satellite image time series (B, C, T, H, W) with a pad mask (B, T).

The data pipeline pads every series to a fixed length T and marks the real dates in
`<m>_time_mask` (True = a real date). Every block here is written so that padded dates can hold
any value without changing what happens to the real ones:

- `compact_time` moves the real dates to the front (stable order), so padding is always a
  suffix, whatever the store did;
- `SpatioTemporalBlock` zeroes padded dates before every convolution (a temporal kernel then
  sees exactly the zeros it would see at the end of an unpadded series) and normalises each
  date on its own (GroupNorm over (C, H, W) of one date), so no statistic mixes dates;
- `TemporalAttention` / `TemporalCrossAttention` use the mask as a key-padding mask (a padded
  date gets exactly zero attention weight) and zero their padded outputs;
- `TemporalPool` collapses T by masked attention pooling or a masked mean;
- `resample_time` resamples the real dates onto a fixed number of slots (for early fusion of
  series with different lengths).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError


def full_mask(x: torch.Tensor) -> torch.Tensor:
    """An all-True (B, T) mask for a (B, C, T, H, W) series given without one."""
    return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)


def safe_mask(mask: torch.Tensor) -> torch.Tensor:
    """A series with no real date at all keeps its first slot, so softmaxes never see an empty set."""
    empty = ~mask.any(dim=1, keepdim=True)
    if bool(empty.any()):
        first = torch.zeros_like(mask)
        first[:, 0] = True
        mask = mask | (empty & first)
    return mask


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padded dates of a (B, C, T, H, W) map (`where`, so even NaN/inf padding becomes 0)."""
    return torch.where(mask[:, None, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def compact_time(x: torch.Tensor, mask: torch.Tensor, dates: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder (B, C, T, H, W) so that the real dates come first (in their order).

    Returns the series (padding zeroed), its new mask and the positions of its dates: the day
    offsets when `dates` (B, T) is given, else the date index 0..n-1 (padding gets 0).
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real (0) before padding (1)
    mask = torch.gather(mask, 1, order)
    index = order[:, None, :, None, None].expand(-1, x.shape[1], -1, x.shape[3], x.shape[4])
    if dates is not None:
        positions = torch.gather(dates.to(x.device).float(), 1, order)
    else:
        positions = torch.arange(x.shape[2], device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
    positions = torch.where(mask, positions, torch.zeros_like(positions))
    return apply_mask(torch.gather(x, 2, index), mask), mask, positions


def resample_time(x: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Resample the real dates of a compacted (B, C, T, H, W) series onto `steps` evenly spaced slots.

    Slot k sits at position k (n - 1) / (steps - 1) along the n real dates of its sample and is
    linearly interpolated between the two neighbouring dates; padding is never read. With n == steps
    this is the identity, so streams with paired dates are concatenated date by date.
    """
    _, c, t, h, w = x.shape
    n = mask.sum(dim=1).clamp(min=1).to(x.dtype)  # (B,)
    k = torch.arange(steps, device=x.device, dtype=x.dtype)
    pos = k[None] * (n[:, None] - 1) / max(steps - 1, 1)  # (B, steps)
    i0 = pos.floor().long().clamp(0, t - 1)
    i1 = torch.minimum(i0 + 1, (n.long() - 1).clamp(min=0)[:, None])
    frac = (pos - i0.to(x.dtype))[:, None, :, None, None]

    def take(i: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 2, i[:, None, :, None, None].expand(-1, c, -1, h, w))

    return take(i0) * (1 - frac) + take(i1) * frac


def sinusoidal_encoding(positions: torch.Tensor, dim: int, period: float = 1000.0) -> torch.Tensor:
    """Transformer sine/cosine encoding of (B, T) positions (date indices or day offsets) -> (B, T, dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(period) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angle = positions.float()[..., None] * freq
    enc = torch.cat([angle.sin(), angle.cos()], dim=-1)
    if dim % 2:
        enc = F.pad(enc, (0, 1))
    return enc


class DateNorm(nn.GroupNorm):
    """GroupNorm of each date's (C, H, W) map on its own: no statistic mixes dates, padded or real."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def groups_for(channels: int, max_groups: int = 8) -> int:
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class SpatioTemporalBlock(nn.Module):
    """Two 3-D convolutions (kernel t x 3 x 3), each after zeroing the padded dates, with per-date GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, time_kernel: int = 3) -> None:
        super().__init__()
        k, p = (time_kernel, 3, 3), (time_kernel // 2, 1, 1)
        self.conv1 = nn.Conv3d(in_channels, out_channels, k, padding=p, bias=False)
        self.norm1 = DateNorm(groups_for(out_channels), out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, k, padding=p, bias=False)
        self.norm2 = DateNorm(groups_for(out_channels), out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = apply_mask(x, mask)
        y = F.gelu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(apply_mask(y, mask)))
        y = F.gelu(y + (x if self.skip is None else self.skip(x)))
        return apply_mask(y, mask)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*H*W, T, C): one sequence of dates per pixel."""
    b, c, t, h, w = x.shape
    return x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)


def _untokens(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, c, t, h, w = shape
    return x.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)


def _pixel_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, T) -> (B*H*W, 1, 1, T) key mask for scaled_dot_product_attention (True = attend)."""
    b, t = mask.shape
    return mask[:, None, None, :].expand(b, h, w, t).reshape(b * h * w, 1, 1, t)


class TemporalAttention(nn.Module):
    """Pre-norm multi-head self-attention over the dates of each pixel + MLP, padded keys masked out.

    Positions (date index, or day offsets when the batch carries them) are encoded with sines and
    added to queries and keys only, so values carry pure features.
    """

    def __init__(self, channels: int, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ConfigError(f"heads={heads} must divide the {channels} channels of the temporal attention.")
        self.heads = heads
        self.norm1 = nn.LayerNorm(channels)
        self.qk = nn.Linear(channels, 2 * channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        return x.reshape(n, t, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        b, c, t, h, w = shape
        tok = _tokens(x)
        y = self.norm1(tok)
        pe = sinusoidal_encoding(positions, c).to(y.dtype)  # (B, T, C)
        pe = pe[:, None, None].expand(b, h, w, t, c).reshape(b * h * w, t, c)
        q, k = self.qk(y + pe).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(self.v(y)),
                                             attn_mask=_pixel_mask(mask, h, w))
        tok = tok + self.proj(out.transpose(1, 2).reshape(-1, t, c))
        tok = tok + self.mlp(self.norm2(tok))
        return apply_mask(_untokens(tok, shape), mask)


class TemporalCrossAttention(nn.Module):
    """Each date of stream A attends to the real dates of stream B at the same pixel (S2 <- S1 and back).

    Zero-initialised output projection: fusion starts as the identity and learns what to take.
    """

    def __init__(self, channels: int, other_channels: int, heads: int = 4) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ConfigError(f"heads={heads} must divide the {channels} channels of the temporal attention.")
        self.heads = heads
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(other_channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(other_channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        return x.reshape(n, t, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor,
                positions: torch.Tensor, other_positions: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        b, c, t, h, w = shape
        if other.shape[-2:] != (h, w):
            other = F.interpolate(other, size=(other.shape[2], h, w), mode="trilinear", align_corners=False)
        q_tok = _tokens(x)
        kv_tok = _tokens(other)
        pe_q = sinusoidal_encoding(positions, c)[:, None, None].expand(b, h, w, t, c).reshape(b * h * w, t, c)
        to = other.shape[2]
        pe_k = sinusoidal_encoding(other_positions, c)[:, None, None].expand(b, h, w, to, c).reshape(b * h * w, to, c)
        q = self.q(self.norm_q(q_tok) + pe_q.to(x.dtype))
        k, v = self.kv(self.norm_kv(kv_tok)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._split(q), self._split(k + pe_k.to(k.dtype)), self._split(v),
                                             attn_mask=_pixel_mask(other_mask, h, w))
        tok = q_tok + self.proj(out.transpose(1, 2).reshape(-1, t, c))
        return apply_mask(_untokens(tok, shape), mask)


class TemporalPool(nn.Module):
    """Collapse T of a (B, C, T, H, W) map to (B, C, H, W) over the real dates only.

    `attention`: a 1x1x1 conv scores every date per pixel for each of `groups` channel groups
    (as L-TAE's heads), a masked softmax over T turns the scores into weights; `mean`: the
    masked mean. Padded dates get exactly zero weight in both.
    """

    def __init__(self, channels: int, mode: str = "attention", groups: int = 4) -> None:
        super().__init__()
        if mode not in ("attention", "mean"):
            raise ValueError(f"unknown temporal pooling {mode!r}")
        self.mode = mode
        self.groups = groups if channels % groups == 0 else 1
        self.score = nn.Conv3d(channels, self.groups, 1) if mode == "attention" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        m = mask[:, None, :, None, None]
        if self.score is None:
            weights = m.to(x.dtype) / m.sum(dim=2, keepdim=True).clamp(min=1).to(x.dtype)
            return (apply_mask(x, mask) * weights).sum(dim=2)
        scores = self.score(x).masked_fill(~m, float("-inf"))
        weights = torch.softmax(scores, dim=2)  # (B, G, T, H, W)
        weights = weights.repeat_interleave(c // self.groups, dim=1)
        return (apply_mask(x, mask) * weights).sum(dim=2)
