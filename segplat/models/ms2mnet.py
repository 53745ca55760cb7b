"""MS2MNet: optical + DSM segmentation with WASE fusion, VFE state-space enhancement, ASAF skips, DFE (`model=ms2mnet`).

The public MS2MNet release ships the two ResNet streams, WASE and the decoder skeleton but not
the VFE, ASAF and DFE modules. They are rebuilt here from the paper's description as summarised
in the model-zoo issue (the paper text itself was not available to us while writing this); every
choice below that the description leaves open is ours and is listed so it can be checked against
the paper.

Streams (`modalities`: exactly two, the optical one first, the DSM / elevation one second):
- two timm ResNets (`backbone`, default resnet50) cut after layer3, run stage by stage:
  stage 0 = conv1/bn1/act1 (stride 2), 1 = maxpool + layer1 (4), 2 = layer2 (8), 3 = layer3 (16).
  `pretrained` is a local timm/torch weights file loaded into both streams (input convs adapted to
  each stream's channels); runs never download.
- WASE at every stage (weighted attention squeeze-excitation): each stream is recalibrated by its
  own SE (GAP -> 1x1 -> ReLU -> 1x1 -> sigmoid); a shared MLP on the pooled descriptors of both
  recalibrated maps gives per-channel modality weights (softmax over the two streams), and the
  fused map is their weighted sum. As in ESANet-style RGB-D encoders, the fused map replaces the
  optical stream's input to the next stage (the DSM stream stays pure) and is the decoder's skip.
- VFE (visual feature enhancement) on the fused map at `vfe_stages` (default the stride-8 and
  stride-16 stages, where flattened sequences are short enough):
  x <- x + DWConv3x3(x); x <- x + MultiScaleSSM(BN(x)); x <- x + ConvBNGELU1x1(x);
  x <- x + FFN(BN(x)) (1x1 convs, ratio 2); x <- SE(x). The "conv" after the mixer is point-wise: a full 3x3
  conv at layer3's 1024 channels would add 9.4M parameters per block for a receptive field the
  depth-wise convs and the scan already cover.
  MultiScaleSSM: 1x1 in-projection to (u, z); gated multi-scale depth-wise branches
  u <- SiLU(g * DW3x3(u) + (1 - g) * DW5x5(u)), g = sigmoid(1x1(u)); a selective (input-dependent
  Delta, B, C) diagonal state-space scan with S4D-real initialisation A = -(1..N), run over the
  flattened map in four orders (row-major, column-major and both reversed; parameters shared,
  directions stacked along the batch) and summed back to the image; channel attention computed
  from the hidden state (mean of h over positions and state dims -> MLP -> sigmoid) rescales the
  scan's readout; then a channel norm, the SiLU(z) gate and a 1x1 out-projection. The scan is pure
  PyTorch: a Hillis-Steele doubling scan of h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t u_t (log2 L
  parallel steps, only products of decays <= 1 and sums, so no overflow), equal to the per-step
  recurrence (tests/models/test_ms2mnet.py checks it against one).
- DFE (DSM gradient enhancement): Sobel gradients of the raw DSM input (per band; magnitude and
  the two components) -> a small conv encoder -> edge priors at strides 2 and 4. At those decoder
  stages the prior gates the features where height jumps: f <- f * (1 + sigmoid(3x3([f, e]))) +
  1x1(e).
- ASAF (adaptive spatial attention fusion) at each decoder stage: the encoder skip and the
  upsampled decoder map are projected to the stage width; a 7x7 conv on their channel mean/max maps
  gives two per-pixel logits, softmax-normalised into weights for the two; the weighted sum goes
  through a 3x3 conv-BN-ReLU.
- Hierarchical decoder: stride 16 -> 8 -> 4 -> 2, ASAF at each step, DFE at strides 4 and 2, a 1x1
  head and bilinear upsampling to the input size. Aux heads in training mode: "f3" on the stride-16
  map and "f2" on the stride-8 map (loss `aux_weights` names).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import timm
import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.base import SegmentationModel
from segplat.models.fusion import FusionSpec
from segplat.models.weights import load_adapted_state_dict

log = logging.getLogger(__name__)

STREAM_PARTS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")


# --------------------------------------------------------------------------------------------
# state-space scan
# --------------------------------------------------------------------------------------------
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal selective SSM over sequences, computed in parallel.

    u, delta: (B, L, D); A: (D, N) (negative); B, C: (B, L, N); D: (D,) skip.
    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,  y_t = <C_t, h_t> + D u_t.
    Returns y (B, L, D) and the hidden state's mean over positions and state dims (B, D).
    """
    a = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, D, N), in (0, 1]
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (B, L, D, N)
    length = u.shape[1]
    k = 1
    while k < length:  # inclusive scan with (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)
        b = torch.cat([b[:, :k], b[:, k:] + a[:, k:] * b[:, :-k]], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    y = torch.einsum("bldn,bln->bld", b, C)
    if D is not None:
        y = y + u * D
    return y, b.mean(dim=(1, 3))


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same SSM as an explicit per-step recurrence (slow; for tests and as the definition)."""
    bsz, length, dim = u.shape
    h = u.new_zeros(bsz, dim, A.shape[1])
    ys, hsum = [], u.new_zeros(bsz, dim)
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
        hsum = hsum + h.mean(-1)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D
    return y, hsum / length


def _orders(h: int, w: int, device: torch.device) -> list[torch.Tensor]:
    """Flattening orders of an h x w map: row-major, column-major, and both reversed."""
    row = torch.arange(h * w, device=device)
    col = row.view(h, w).t().reshape(-1)
    return [row, col, row.flip(0), col.flip(0)]


class MultiScaleSSM(nn.Module):
    """Gated 3x3/5x5 depth-wise branches, then a four-direction selective scan with channel attention on h."""

    def __init__(self, dim: int, d_state: int = 8, expand: float = 1.0, dt_min: float = 1e-3,
                 dt_max: float = 1e-1) -> None:
        super().__init__()
        inner = max(8, int(dim * expand))
        self.inner, self.d_state = inner, d_state
        self.dt_rank = max(1, -(-dim // 16))
        self.in_proj = nn.Conv2d(dim, 2 * inner, 1)
        self.dw3 = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.dw5 = nn.Conv2d(inner, inner, 5, padding=2, groups=inner)
        self.gate = nn.Conv2d(inner, inner, 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        # Mamba's initialisation: softplus(dt bias) log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(inner) * (torch.log(torch.tensor(dt_max)) - torch.log(torch.tensor(dt_min)))
                       + torch.log(torch.tensor(dt_min)))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        hidden = max(4, inner // 4)
        self.channel_attn = nn.Sequential(nn.Linear(inner, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, inner))
        self.norm = nn.GroupNorm(1, inner)
        self.out_proj = nn.Conv2d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, _, h, w = x.shape
        u, z = self.in_proj(x).chunk(2, dim=1)
        g = torch.sigmoid(self.gate(u))
        u = F.silu(g * self.dw3(u) + (1 - g) * self.dw5(u))
        seq = u.flatten(2).transpose(1, 2)  # (B, L, D), row-major
        orders = _orders(h, w, x.device)
        seqs = torch.cat([seq[:, o] for o in orders], dim=0)  # (4B, L, D)
        dt, b_in, c_in = self.x_proj(seqs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log.float())
        y, hidden = selective_scan(seqs.float(), delta.float(), A, b_in.float(), c_in.float(), self.D.float())
        y, hidden = y.to(x.dtype), hidden.to(x.dtype)
        out = torch.zeros_like(seq)
        for i, o in enumerate(orders):  # undo each flattening order and sum the directions
            out = out.index_add(1, o, y[i * bsz:(i + 1) * bsz])
        attn = torch.sigmoid(self.channel_attn(hidden.view(len(orders), bsz, -1).mean(0)))  # (B, D)
        out = (out * attn[:, None, :]).transpose(1, 2).reshape(bsz, self.inner, h, w)
        return self.out_proj(self.norm(out) * F.silu(z))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class VFE(nn.Module):
    """Visual feature enhancement: depth-wise conv, multi-scale SSM mixer, conv, FFN + SE (all residual)."""

    def __init__(self, dim: int, d_state: int = 8, expand: float = 1.0, ffn_ratio: float = 2.0) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.mixer = MultiScaleSSM(dim, d_state, expand)
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.GELU())
        self.norm2 = nn.BatchNorm2d(dim)
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.se = SqueezeExcite(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dw(x)
        x = x + self.mixer(self.norm1(x))
        x = x + self.conv(x)
        x = x + self.ffn(self.norm2(x))
        return self.se(x)


class WASE(nn.Module):
    """Weighted attention squeeze-excitation fusion of an optical and a DSM map of equal width."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.se_opt = SqueezeExcite(channels, reduction)
        self.se_dsm = SqueezeExcite(channels, reduction)
        hidden = max(8, channels // reduction)
        self.weights = nn.Sequential(nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, 2 * channels))

    def forward(self, opt: torch.Tensor, dsm: torch.Tensor) -> torch.Tensor:
        opt, dsm = self.se_opt(opt), self.se_dsm(dsm)
        desc = torch.cat([opt.mean(dim=(2, 3)), dsm.mean(dim=(2, 3))], dim=1)
        w = torch.softmax(self.weights(desc).view(-1, 2, opt.shape[1]), dim=1)  # per channel, over the streams
        return w[:, 0, :, None, None] * opt + w[:, 1, :, None, None] * dsm


class WaseVfe(nn.Module):
    """One encoder stage's fusion: WASE, then (at `vfe_stages`) VFE on the fused map."""

    def __init__(self, channels: int, vfe: bool, d_state: int = 8, expand: float = 1.0) -> None:
        super().__init__()
        self.wase = WASE(channels)
        self.vfe = VFE(channels, d_state, expand) if vfe else nn.Identity()

    def forward(self, opt: torch.Tensor, dsm: torch.Tensor) -> torch.Tensor:
        return self.vfe(self.wase(opt, dsm))


# --------------------------------------------------------------------------------------------
# streams, decoder parts
# --------------------------------------------------------------------------------------------
class ResNetStream(nn.Module):
    """A timm ResNet-family model cut after layer3, callable one stage at a time."""

    def __init__(self, name: str, in_chans: int, pretrained: str | None = None) -> None:
        super().__init__()
        try:
            net = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
        except RuntimeError as err:
            raise ConfigError(f"model.backbone={name!r} is not a timm model ({err}); use a ResNet such as "
                              "resnet50 or resnet18.") from err
        missing = [p for p in STREAM_PARTS if not hasattr(net, p)]
        if missing:
            raise ConfigError(f"model.backbone={name!r} has no {missing}: MS2MNet needs a timm ResNet-family "
                              "backbone (resnet18/34/50/101, resnet10t, resnext50_32x4d, ...).")
        if pretrained:
            report = load_adapted_state_dict(net, pretrained, in_chans)
            log.info("loaded %s into %s: %s", pretrained, name, report)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act1)
        self.stages = nn.ModuleList([nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3])
        self.out_channels = [int(f["num_chs"]) for f in net.feature_info[:4]]

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x) if i == 0 else self.stages[i - 1](x)


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ASAF(nn.Module):
    """Adaptive spatial attention fusion of an encoder skip and the upsampled decoder map."""

    def __init__(self, skip_channels: int, dec_channels: int, out_channels: int) -> None:
        super().__init__()
        self.skip = conv_bn_relu(skip_channels, out_channels, 1)
        self.dec = conv_bn_relu(dec_channels, out_channels, 1)
        self.attn = nn.Conv2d(4, 2, 7, padding=3)
        self.out = conv_bn_relu(out_channels, out_channels)

    def forward(self, skip: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        dec = F.interpolate(dec, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        s, d = self.skip(skip), self.dec(dec)
        desc = torch.cat([s.mean(1, keepdim=True), s.amax(1, keepdim=True), d.mean(1, keepdim=True),
                          d.amax(1, keepdim=True)], dim=1)
        w = torch.softmax(self.attn(desc), dim=1)
        return self.out(w[:, :1] * s + w[:, 1:] * d)


class DSMEdges(nn.Module):
    """Sobel gradients of the DSM (per band: gx, gy, magnitude) encoded into edge priors at strides 2 and 4."""

    def __init__(self, dsm_channels: int, width: int = 32) -> None:
        super().__init__()
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
        kernel = torch.stack([sobel_x, sobel_x.t()])[:, None].repeat(dsm_channels, 1, 1, 1)  # (2C, 1, 3, 3)
        self.register_buffer("kernel", kernel, persistent=False)
        self.channels = dsm_channels
        self.enc2 = nn.Sequential(conv_bn_relu(3 * dsm_channels, width, 3, 2), conv_bn_relu(width, width))
        self.enc4 = conv_bn_relu(width, width, 3, 2)
        self.out_channels = width

    def gradients(self, dsm: torch.Tensor) -> torch.Tensor:
        g = F.conv2d(F.pad(dsm, (1, 1, 1, 1), mode="replicate"), self.kernel.to(dsm.dtype), groups=self.channels)
        gx, gy = g[:, 0::2], g[:, 1::2]
        return torch.cat([gx, gy, torch.sqrt(gx * gx + gy * gy + 1e-6)], dim=1)

    def forward(self, dsm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e2 = self.enc2(self.gradients(dsm))
        return e2, self.enc4(e2)


class DFE(nn.Module):
    """Gate decoder features with a DSM edge prior: f * (1 + sigmoid(3x3([f, e]))) + 1x1(e)."""

    def __init__(self, channels: int, edge_channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels + edge_channels, 1, 3, padding=1)
        self.inject = nn.Conv2d(edge_channels, channels, 1)

    def forward(self, f: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if e.shape[-2:] != f.shape[-2:]:
            e = F.interpolate(e, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return f * (1 + torch.sigmoid(self.gate(torch.cat([f, e], dim=1)))) + self.inject(e)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class MS2MNet(SegmentationModel):
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"mid": ("wase_vfe",)}
    default_fusion: ClassVar[FusionSpec] = FusionSpec("mid", "wase_vfe")
    fixed_fusion = "WASE at every encoder stage, VFE at model.vfe_stages"
    fusion_stages_selectable = False
    stream_roles = "optical first, DSM second"

    def __init__(self, modalities: Mapping[str, int], num_classes: int, fusion: Any = None,
                 backbone: str = "resnet50", pretrained: str | None = None,
                 decoder_channels: Sequence[int] = (256, 128, 64, 64), vfe_stages: Sequence[int] = (2, 3),
                 d_state: int = 8, ssm_expand: float = 1.0, edge_channels: int = 32, head_dropout: float = 0.1,
                 aux_heads: bool = True) -> None:
        super().__init__(modalities, num_classes)
        self.check_fusion(fusion, len(self.modalities))
        if len(self.modalities) != 2:
            raise ConfigError(f"MS2MNet fuses exactly two modalities (optical first, DSM second) but "
                              f"dataset.modalities gives {list(self.modalities)}; list two.")
        if len(decoder_channels) != 4:
            raise ConfigError(f"model.decoder_channels={list(decoder_channels)} needs four widths "
                              "(strides 16, 8, 4, 2).")
        bad = [s for s in vfe_stages if not 0 <= int(s) <= 3]
        if bad:
            raise ConfigError(f"model.vfe_stages={list(vfe_stages)} names stages outside 0..3.")
        self.opt_name, self.dsm_name = list(self.modalities)
        self.encoders = nn.ModuleDict({
            "optical": ResNetStream(backbone, self.modalities[self.opt_name], pretrained),
            "dsm": ResNetStream(backbone, self.modalities[self.dsm_name], pretrained),
        })
        chans = self.encoders["optical"].out_channels
        vfe = {int(s) for s in vfe_stages}
        self.fusion = nn.ModuleDict({str(i): WaseVfe(c, i in vfe, d_state, ssm_expand) for i, c in enumerate(chans)})
        c16, c8, c4, c2 = (int(c) for c in decoder_channels)
        self.center = conv_bn_relu(chans[3], c16)
        self.asaf8 = ASAF(chans[2], c16, c8)
        self.asaf4 = ASAF(chans[1], c8, c4)
        self.asaf2 = ASAF(chans[0], c4, c2)
        self.edges = DSMEdges(self.modalities[self.dsm_name], edge_channels)
        self.dfe4 = DFE(c4, edge_channels)
        self.dfe2 = DFE(c2, edge_channels)
        self.head = nn.Sequential(nn.Dropout2d(head_dropout) if head_dropout else nn.Identity(),
                                  nn.Conv2d(c2, num_classes, 1))
        self.aux = nn.ModuleDict({"f3": nn.Conv2d(c16, num_classes, 1), "f2": nn.Conv2d(c8, num_classes, 1)}) \
            if aux_heads else None

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        opt, dsm = inputs[self.opt_name], inputs[self.dsm_name]
        size = opt.shape[-2:]
        if dsm.shape[-2:] != size:
            dsm = F.interpolate(dsm, size=size, mode="bilinear", align_corners=False)
        skips = []
        x_opt, x_dsm = opt, dsm
        for i in range(4):
            x_opt = self.encoders["optical"].stage(i, x_opt)
            x_dsm = self.encoders["dsm"].stage(i, x_dsm)
            x_opt = self.fusion[str(i)](x_opt, x_dsm)  # the fused map drives the optical stream on
            skips.append(x_opt)
        e2, e4 = self.edges(dsm)
        d16 = self.center(skips[3])
        d8 = self.asaf8(skips[2], d16)
        d4 = self.dfe4(self.asaf4(skips[1], d8), e4)
        d2 = self.dfe2(self.asaf2(skips[0], d4), e2)
        out = {"out": F.interpolate(self.head(d2), size=size, mode="bilinear", align_corners=False)}
        if self.training and self.aux is not None:
            out["f3"] = self.aux["f3"](d16)
            out["f2"] = self.aux["f2"](d8)
        return out
