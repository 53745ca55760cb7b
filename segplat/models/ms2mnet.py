"""MS2MNet (multiscale state-space mixer network) for optical + DSM segmentation (`model=ms2mnet`).

Built on the public release (`DrWuHonglin/MS2MNet`, `models/MS2MNet.py`) for every part it contains, with its
module names, so a state dict saved by the release loads (`segplat.models.convert.ms2mnet`), and on the
release's figures (`images/Framework.png`, `VFE.png`, `MSSM.png`, `ASAF.png`) for the parts it leaves
undefined (VFE, ASAF, DFE). Exactly two modalities: the optical one first (3 bands in the paper), the DSM second.

As released (module names in brackets):
- Two independent ResNet-50 streams [`rgb_backbone`, `dsm_backbone`] (torchvision's module names; built here
  with timm, whose ResNet-50 has the same parameters and names), each run to layer3: maps at strides 2, 4, 8,
  16 with 64/256/512/1024 channels. The release also builds layer4 but never runs it: it is not built here
  and a released state dict's `layer4` tensors are dropped on load. `pretrained` (a local ImageNet ResNet
  weights file) starts both streams; the DSM stream's first conv is the MEAN of the pretrained RGB filters,
  as released (for c > 1 DSM bands: that mean repeated and divided by c).
- WASE fusion at all four stages [`waseFusion1..4`]: per-stream squeeze-excite (1x1 conv, ReLU, 1x1 conv,
  sigmoid; reduction 16, biases) and two learnable scalars normalised as |w_x| / (|w_x| + |w_y| + 1e-8):
  f = n_x * se_x * x + n_y * se_y * y. The fused maps go to the decoder only; the streams stay independent.
- VFE at all four stages as f <- f + 0.5 * VFE(f) [`vfeBlock1..4`, `residual_rate`], state sizes 16/24/28/32.
- `HFPDecoder` [`decoder`]: 1x1 ConvBNReLU6 projections of the stride-16 and stride-8 maps to 256 [`Conv1`,
  `Conv2`]; three decoder blocks [`b4`, `b3`, `b2`] = x + BN(multi-scale attention(x)), then x + E-FFN(x);
  the attention takes queries from x and keys/values from a multi-dilation conv block pooled to 16x16
  (`MMPADBlock`), plus a channel-attention term; E-FFN = 1x1 to C/4, parallel depth-wise 5x5 and 3x3 convs,
  1x1 back (all BN, ReLU6). ASAF fusions [`p3`, `p2`, `p1`] at strides 8, 4, 2; a 1x1 ConvBN to 64 channels
  [`Conv3`] before the last; the MAF head [`seg_head`] at stride 2 (three dilated depth-wise branches,
  channel and spatial attention, separable conv, bias-free 1x1 classifier). Aux heads (3x3 ConvBNReLU6 to
  256, dropout, 1x1) after `p3` (stride 8, output "f3") and after `p2` (stride 4, output "f2"), in training.
  They weigh 0.3 and 0.2 by default (`aux_outputs`), the release's Vaihingen recipe; its Potsdam one is
  `loss.aux_weights={f3: 0.4, f2: 0.2}`.

From the figures (the release references these modules but does not define them); every choice a figure
leaves open is listed with the figure it fills:
- DFE (`Framework.png`: DFE on the raw DSM before the DSM stream's first conv-BN-ReLU; no figure of its
  inside; README: "enriches elevation data representations through gradient information augmentation"):
  Sobel gradients of the DSM (gx, gy, magnitude, per band) with the DSM itself -> 3x3 conv-BN-ReLU (16) ->
  1x1 conv back to the DSM's bands, added to the DSM. The 1x1 conv starts at zero, so DFE starts as the
  identity and the pretrained DSM stream sees the DSM it was adapted for.
- VFE (`VFE.png`): x <- x + DWConv3x3(x); x <- x + MSSM(LayerNorm(x)); x <- x + ReLU(BN(Conv3x3(x)));
  x <- x + SE(FFN(x)); returns (x, the mixer's hidden state) as the release unpacks. Box internals the
  figure does not draw come from EfficientViM (Lee et al., CVPR 2025), the block the release names as
  VFE's origin ("enhanced EfficientViMBlock") and whose helpers (LayerNorm1D, ConvLayer1D/2D,
  SqueezeExcite) the release ships unused: DWConv = depth-wise conv + BatchNorm (EfficientViM's
  ConvLayer2D); LayerNorm over channels, eps 1e-5 (LayerNorm1D); FFN = 1x1 conv-BN-ReLU to
  `vfe_mlp_ratio` x C, 1x1 conv-BN back (EfficientViM's FFN and default ratio 4); SE = the release's
  SqueezeExcite (GAP, 1x1 to max(C/4, 8), SiLU, 1x1, sigmoid). "Conv 3x3" is a full 3x3 conv (the figure
  tells it apart from the DWConv box). Plain residual sums as drawn (no EfficientViM layer scale).
- MSSM, the state-space mixer (`MSSM.png`), EfficientViM's hidden-state mixer (HSM-SSD) with the figure's
  additions, all matrix products over the whole map (no scan, no per-pixel loop): ConvLayer = bias-free 1x1
  conv to 3N (N = state size); multi-scale gate: g = sigmoid(1x1 conv), g * DW3x3 + (1 - g) * DW5x5 (the
  figure's Gate feeds both products; the complementary 1 - g is our reading); split into Delta, B, C;
  A' = softmax_L(Delta + A) with A ~ U(1, 16) per state (the figure's "Software" box is this softmax);
  H = X (A' * B)^T, (B, C, N); channel attention on H (the release's SqueezeExcite over H's channels) scales
  H; ConvLayer (1x1 on H) -> split H', Z; H'' = H' * SiLU(Z) * gamma, gamma a learnable scalar initialised
  to 1 (the figure's second product with the input drawn "Y"; EfficientViM's D); ConvLayer (1x1) -> H''';
  output = H''' C, back to (B, C, H, W). Cost is linear in pixels; N <= 32, so H is tiny.
- ASAF (`ASAF.png`), fusing the encoder map X_en with the upsampled decoder map X: w = sigmoid(conv5x5(
  [mean_c(X_en), max_c(X_en)])) (the release's own spatial attention, as in its MAF head), w * X_en +
  (1 - w) * X, then the figure's Conv5x5, BN, Conv1x1, BN, ReLU6 = the release's SeparableConvBNReLU with
  a 5x5 depth-wise conv (box for box; a full 5x5 conv at 256 channels on the stride-4 map would cost more
  than both ResNet streams). Before `p2`, a backbone whose layer1 width is not `decode_channels` gets a
  1x1 ConvBNReLU6 [`decoder.res2_proj`] (never for ResNet-50, where both are 256; the release's `Conv3`
  likewise takes `decode_channels`, which it writes as encode_channels[-3], equal for ResNet-50).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import timm
import torch
from timm.layers import LayerNorm2d, SEModule
from torch import nn
from torch.nn import functional as F

from segplat.errors import ConfigError
from segplat.models.base import SegmentationModel
from segplat.models.fusion import FusionSpec
from segplat.models.layers import conv_bn_act
from segplat.schema import Hint, NonNegativeFloat, OpenFraction, PositiveFloat, PositiveInt

log = logging.getLogger(__name__)

DILATIONS = ((1, 3, 5), (3, 5, 7), (5, 7, 9), (7, 9, 11))  # the release's per-block dilations, last = MAF head
STATE_DIMS = (16, 24, 28, 32)  # the release's VFE state sizes, stride 2 to stride 16
StateDims = Annotated[tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt],
                      Hint("one VFE state size per stage; the release's 16, 24, 28, 32")]


def conv_bn_relu6(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    """The release's ConvBNReLU: bias-free conv, BatchNorm, ReLU6."""
    return conv_bn_act(cin, cout, k, groups=groups, act=nn.ReLU6)


def separable_conv_bn_relu6(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """The release's SeparableConvBNReLU: depth-wise k x k conv, BN, point-wise 1x1 conv, BN, ReLU6."""
    return nn.Sequential(nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


def squeeze_excite(channels: int) -> SEModule:
    """The release's SqueezeExcite: GAP, 1x1 conv to max(C/4, 8), SiLU, 1x1 conv, sigmoid (biased convs)."""
    return SEModule(channels, rd_channels=max(channels // 4, 8), act_layer=nn.SiLU)


# ------------------------------------------------------------------------------------------- released parts
class WASEFusion(nn.Module):
    """Weighted squeeze-excite fusion: each stream recalibrated by its own SE, mixed by two normalised scalars."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc_x = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1),
                                  nn.Sigmoid())
        self.fc_y = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1),
                                  nn.Sigmoid())
        self.weight_x = nn.Parameter(torch.ones(1))
        self.weight_y = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        se_x = self.fc_x(x.mean(dim=(2, 3), keepdim=True))
        se_y = self.fc_y(y.mean(dim=(2, 3), keepdim=True))
        total = self.weight_x.abs() + self.weight_y.abs() + 1e-8
        return (self.weight_x.abs() / total) * se_x * x + (self.weight_y.abs() / total) * se_y * y


class EFFN(nn.Module):
    """The release's E_FFN: 1x1 to `hidden`, parallel depth-wise 5x5 and 3x3, summed, 1x1 back; ReLU6."""

    def __init__(self, dim: int, hidden: int, ksize: int = 5) -> None:
        super().__init__()
        self.fc1 = conv_bn_relu6(dim, hidden, 1)
        self.conv1 = conv_bn_relu6(hidden, hidden, ksize, groups=hidden)
        self.conv2 = conv_bn_relu6(hidden, hidden, 3, groups=hidden)
        self.fc2 = conv_bn_act(hidden, dim, 1, act=None)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.act(self.fc2(self.conv1(x) + self.conv2(x)))


class _DilatedBranches(nn.Module):
    """Shared forward of the release's MMPADBlock and MAF: relu6(bn(conv)) chains named as the release names them."""

    def _cbr(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.relu(getattr(self, f"bn{name}")(getattr(self, f"conv{name}")(x)))


class MMPADBlock(_DilatedBranches):
    """Keys/values source of the decoder attention: four branches (depth-wise dilated 3x3 at three rates and a 1x1)
    from a C/r squeeze, summed, 1x1, times the input, average-pooled to `pool` x `pool`."""

    def __init__(self, dim: int, fc_ratio: int, dilation: Sequence[int], pool: int) -> None:
        super().__init__()
        mid = dim // fc_ratio
        self.conv0_1, self.bn0_1 = nn.Conv2d(dim, mid, 1), nn.BatchNorm2d(mid)
        for branch, d in zip((0, 1, 2), dilation[-3:]):
            setattr(self, f"conv{branch}_2", nn.Conv2d(mid, mid, 3, padding=d, dilation=d, groups=mid))
            setattr(self, f"bn{branch}_2", nn.BatchNorm2d(mid))
            setattr(self, f"conv{branch}_3", nn.Conv2d(mid, dim, 1))
            setattr(self, f"bn{branch}_3", nn.BatchNorm2d(dim))
        self.conv3_2, self.bn3_2 = nn.Conv2d(mid, mid, 1), nn.BatchNorm2d(mid)
        self.conv3_3, self.bn3_3 = nn.Conv2d(mid, dim, 1), nn.BatchNorm2d(dim)
        self.conv4, self.bn4 = nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim)
        self.relu = nn.ReLU6()
        self.Avg = nn.AdaptiveAvgPool2d(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self._cbr("0_1", x)
        attn = sum(self._cbr(f"{b}_3", self._cbr(f"{b}_2", squeezed)) for b in range(4))
        return self.Avg(self._cbr("4", attn) * x)


class MultiScaleMHSA(nn.Module):
    """The release's Mutilscal_MHSA: queries from every pixel, keys/values from the pooled MMPADBlock map, plus
    a channel-attention term x * fc(GAP(x))."""

    def __init__(self, dim: int, heads: int, dilation: Sequence[int], fc_ratio: int, pool: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.decode_channels={dim} must be divisible by the decoder's {heads} heads.")
        self.heads = heads
        self.MSC = MMPADBlock(dim, fc_ratio, dilation, pool)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(dim, dim // fc_ratio, 1), nn.ReLU6(), nn.Conv2d(dim // fc_ratio, dim, 1),
                                nn.Sigmoid())
        self.kv = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        kv = self.kv(self.MSC(x))
        q = x.view(b, self.heads, d, h * w).transpose(-1, -2)
        k, v = kv.view(b, 2, self.heads, d, -1).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return out + x * self.fc(self.avgpool(x))


class DecoderBlock(nn.Module):
    """The release's decoder Block: x + BN(attention(x)), then x + E-FFN(x) (hidden C / mlp_ratio)."""

    def __init__(self, dim: int, dilation: Sequence[int], heads: int = 16, mlp_ratio: int = 4, pool: int = 16) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = MultiScaleMHSA(dim, heads, dilation, mlp_ratio, pool)
        self.mlp = EFFN(dim, dim // mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.attn(x))
        return x + self.mlp(x)


class MAF(_DilatedBranches):
    """The release's segmentation head: dilated depth-wise branches + channel and spatial attention, then a
    separable conv, dropout and a bias-free 1x1 classifier."""

    def __init__(self, dim: int, fc_ratio: int, dilation: Sequence[int], dropout: float, num_classes: int) -> None:
        super().__init__()
        mid = dim // fc_ratio
        self.conv0, self.bn0 = nn.Conv2d(dim, mid, 1), nn.BatchNorm2d(mid)
        for branch, d in zip((1, 2, 3), dilation[-3:]):
            setattr(self, f"conv{branch}_1", nn.Conv2d(mid, mid, 3, padding=d, dilation=d, groups=mid))
            setattr(self, f"bn{branch}_1", nn.BatchNorm2d(mid))
            setattr(self, f"conv{branch}_2", nn.Conv2d(mid, dim, 1))
            setattr(self, f"bn{branch}_2", nn.BatchNorm2d(dim))
        self.relu = nn.ReLU6()
        self.conv4, self.bn4 = nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(dim, mid, 1), nn.ReLU6(), nn.Conv2d(mid, dim, 1), nn.Sigmoid())
        self.s_conv = nn.Conv2d(2, 1, 5, padding=2)
        self.head = nn.Sequential(separable_conv_bn_relu6(dim, dim, 3), nn.Dropout2d(dropout),
                                  nn.Sequential(nn.Conv2d(dim, num_classes, 1, bias=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self._cbr("0", x)
        attn = sum(self._cbr(f"{b}_2", self._cbr(f"{b}_1", squeezed)) for b in (1, 2, 3))
        spatial = torch.sigmoid(self.s_conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)))
        channel = self.fc(self.avg_pool(x))
        return self.head(self._cbr("4", attn) * x + x * channel + x * spatial)


# ------------------------------------------------------------------------------------ parts from the figures
class ASAFFusion(nn.Module):
    """ASAF.png: w = SA(X_en); w * X_en + (1 - w) * up(X); Conv5x5, BN, Conv1x1, BN, ReLU6 (separable)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, 5, padding=2)
        self.post = separable_conv_bn_relu6(dim, dim, 5)

    def forward(self, x: torch.Tensor, x_en: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != x_en.shape[-2:]:
            x = F.interpolate(x, size=x_en.shape[-2:], mode="bilinear", align_corners=False)
        w = torch.sigmoid(self.spatial(torch.cat([x_en.mean(1, keepdim=True), x_en.amax(1, keepdim=True)], dim=1)))
        return self.post(w * x_en + (1 - w) * x)


class MSSM(nn.Module):
    """MSSM.png: the hidden-state mixer in matrix form; returns (B, C, H, W) and the hidden state (B, C, N)."""

    def __init__(self, dim: int, state_dim: int, ssd_expand: float = 1.0,
                 a_init_range: tuple[float, float] = (1.0, 16.0)) -> None:
        super().__init__()
        self.state_dim = state_dim
        self.d_inner = int(dim * ssd_expand)
        width = 3 * state_dim
        self.BCdt_proj = nn.Conv2d(dim, width, 1, bias=False)
        self.dw3 = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.dw5 = nn.Conv2d(width, width, 5, padding=2, groups=width, bias=False)
        self.gate = nn.Conv2d(width, width, 1)
        self.A = nn.Parameter(torch.empty(state_dim).uniform_(*a_init_range))
        self.channel_attn = squeeze_excite(dim)
        self.hz_proj = nn.Conv1d(dim, 2 * self.d_inner, 1, bias=False)
        self.out_proj = nn.Conv1d(self.d_inner, dim, 1, bias=False)
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        bcdt = self.BCdt_proj(x)
        g = torch.sigmoid(self.gate(bcdt))
        bcdt = (g * self.dw3(bcdt) + (1 - g) * self.dw5(bcdt)).flatten(2)
        dt, b_in, c_out = bcdt.split(self.state_dim, dim=1)  # Delta, B, C: (B, N, L) each
        a = torch.softmax(dt + self.A.view(1, -1, 1), dim=-1)  # over the L positions
        hidden = x.flatten(2) @ (a * b_in).transpose(-1, -2)  # (B, C, N)
        hidden = self.channel_attn(hidden.unsqueeze(-1)).squeeze(-1)
        h_prime, z = self.hz_proj(hidden).split(self.d_inner, dim=1)
        hidden = self.out_proj(h_prime * F.silu(z) * self.gamma)  # (B, C, N)
        return (hidden @ c_out).view(b, c, h, w), hidden


class VFE(nn.Module):
    """VFE.png: DWConv3x3, LayerNorm + MSSM, Conv3x3-BN-ReLU, FFN + SE, each a residual; returns (x, hidden)."""

    def __init__(self, dim: int, state_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = conv_bn_act(dim, dim, 3, groups=dim, act=None)
        self.norm = LayerNorm2d(dim, eps=1e-5)
        self.mixer = MSSM(dim, state_dim)
        self.conv = conv_bn_act(dim, dim, 3)
        self.ffn = nn.Sequential(conv_bn_act(dim, hidden, 1), conv_bn_act(hidden, dim, 1, act=None))
        self.se = squeeze_excite(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.dwconv(x)
        mixed, hidden = self.mixer(self.norm(x))
        x = x + mixed
        x = x + self.conv(x)
        return x + self.se(self.ffn(x)), hidden


class DFE(nn.Module):
    """DSM feature enhancement (Framework.png, before the DSM stream): DSM + 1x1(CBR3x3([DSM, gx, gy, |g|]))."""

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
        self.register_buffer("sobel", torch.stack([sobel_x, sobel_x.t()])[:, None].repeat(channels, 1, 1, 1),
                             persistent=False)
        self.channels = channels
        self.encode = conv_bn_act(4 * channels, hidden, 3)
        self.project = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def gradients(self, dsm: torch.Tensor) -> torch.Tensor:
        """Per band: gx, gy (Sobel, replicate padding) and the magnitude; (B, 3C, H, W)."""
        g = F.conv2d(F.pad(dsm, (1, 1, 1, 1), mode="replicate"), self.sobel.to(dsm.dtype), groups=self.channels)
        gx, gy = g[:, 0::2], g[:, 1::2]
        return torch.cat([gx, gy, torch.sqrt(gx * gx + gy * gy + 1e-6)], dim=1)

    def forward(self, dsm: torch.Tensor) -> torch.Tensor:
        return dsm + self.project(self.encode(torch.cat([dsm, self.gradients(dsm)], dim=1)))


# ---------------------------------------------------------------------------------------- streams, decoder
class ResNetStream(nn.Module):
    """A timm ResNet run to layer3, under torchvision's (the release's) names; returns the four stage maps."""

    def __init__(self, name: str, in_chans: int) -> None:
        super().__init__()
        try:
            net = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0, zero_init_last=False)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"model.backbone={name!r} is not a timm ResNet ({err}); use resnet50 (the paper's), "
                              "resnet18 or resnet34.") from err
        missing = [p for p in ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3") if not hasattr(net, p)]
        if missing:
            raise ConfigError(f"model.backbone={name!r} has no {missing}: MS2MNet needs a timm ResNet-family "
                              "backbone (resnet50 as released, resnet18/34/101, resnext50_32x4d, ...).")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.out_channels = [int(f["num_chs"]) for f in net.feature_info[:4]]
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b0 = self.relu(self.bn1(self.conv1(x)))
        b1 = self.layer1(self.maxpool(b0))
        b2 = self.layer2(b1)
        return [b0, b1, b2, self.layer3(b2)]


class HFPDecoder(nn.Module):
    """The release's decoder; `forward(f1, f2, f3, f4)` -> (logits at stride 2, aux at 8, aux at 4)."""

    def __init__(self, encode_channels: Sequence[int], decode_channels: int, num_classes: int, dropout: float = 0.1,
                 fc_ratio: int = 4, aux_channels: int = 256, aux_heads: bool = True) -> None:
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in encode_channels)
        dec = int(decode_channels)
        self.Conv1 = conv_bn_relu6(c4, dec, 1)
        self.Conv2 = conv_bn_relu6(c3, dec, 1)
        self.b4 = DecoderBlock(dec, DILATIONS[0], mlp_ratio=fc_ratio)
        self.p3 = ASAFFusion(dec)
        self.b3 = DecoderBlock(dec, DILATIONS[1], mlp_ratio=fc_ratio)
        if c2 != dec:
            self.res2_proj = conv_bn_relu6(c2, dec, 1)
        self.p2 = ASAFFusion(dec)
        self.b2 = DecoderBlock(dec, DILATIONS[2], mlp_ratio=fc_ratio)
        self.Conv3 = conv_bn_act(dec, c1, 1, act=None)
        self.p1 = ASAFFusion(c1)
        self.seg_head = MAF(c1, fc_ratio, DILATIONS[3], dropout, num_classes)
        self.aux_head3 = self.aux_head2 = None  # without aux heads none is built: unused weights stop DDP
        if aux_heads:
            self.aux_head3 = nn.Sequential(conv_bn_relu6(dec, aux_channels, 3), nn.Dropout2d(dropout),
                                           nn.Conv2d(aux_channels, num_classes, 1))
            self.aux_head2 = nn.Sequential(conv_bn_relu6(dec, aux_channels, 3), nn.Dropout2d(dropout),
                                           nn.Conv2d(aux_channels, num_classes, 1))

    def forward(self, res1: torch.Tensor, res2: torch.Tensor, res3: torch.Tensor, res4: torch.Tensor,
                aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = self.p3(self.b4(self.Conv1(res4)), self.Conv2(res3))
        aux3 = self.aux_head3(x) if aux and self.aux_head3 is not None else None
        if hasattr(self, "res2_proj"):
            res2 = self.res2_proj(res2)
        x = self.p2(self.b3(x), res2)
        aux2 = self.aux_head2(x) if aux and self.aux_head2 is not None else None
        x = self.p1(self.Conv3(self.b2(x)), res1)
        return self.seg_head(x), aux3, aux2


# ---------------------------------------------------------------------------------------------- the model
class MS2MNet(SegmentationModel):
    supported_fusion: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"mid": ("wase_vfe",)}
    default_fusion: ClassVar[FusionSpec] = FusionSpec("mid", "wase_vfe")
    fixed_fusion = "WASE and VFE at every encoder stage, as released"
    fusion_stages_selectable = False
    stream_roles = "optical first, DSM second"
    encoder_prefixes: ClassVar[tuple[str, ...]] = ("rgb_backbone", "dsm_backbone")
    # the DFE is new (randomly initialised) like the fusion modules, so it trains with them
    fusion_prefixes: ClassVar[tuple[str, ...]] = ("dfeBlock", *(f"waseFusion{i}" for i in range(1, 5)),
                                                  *(f"vfeBlock{i}" for i in range(1, 5)))

    def __init__(self, modalities: Mapping[str, int], num_classes: int, fusion: Any = None,
                 backbone: Annotated[str, Hint("a timm ResNet: resnet50 as released, resnet18/34/...")] = "resnet50",
                 pretrained: str | Path | None = None,
                 decode_channels: Annotated[PositiveInt, Hint("divisible by the decoder's heads")] = 256,
                 dropout: OpenFraction = 0.1,
                 residual_rate: Annotated[NonNegativeFloat, Hint("f + residual_rate * VFE(f)")] = 0.5,
                 state_dims: StateDims = STATE_DIMS, vfe_mlp_ratio: PositiveFloat = 4.0,
                 aux_heads: bool = True) -> None:
        super().__init__(modalities, num_classes)
        self.check_fusion(fusion, len(self.modalities))
        self.opt_name, self.dsm_name = list(self.modalities)
        dsm_chans = self.modalities[self.dsm_name]
        self.dfeBlock = DFE(dsm_chans)
        self.rgb_backbone = ResNetStream(backbone, self.modalities[self.opt_name])
        self.dsm_backbone = ResNetStream(backbone, dsm_chans)
        chans = self.rgb_backbone.out_channels
        for i, (c, n) in enumerate(zip(chans, state_dims), start=1):
            setattr(self, f"waseFusion{i}", WASEFusion(c))
            setattr(self, f"vfeBlock{i}", VFE(c, int(n), vfe_mlp_ratio))
        self.residual_rate = float(residual_rate)
        self.aux_heads = bool(aux_heads)
        self.decoder = HFPDecoder(chans, decode_channels, num_classes, dropout, aux_heads=self.aux_heads)
        if pretrained:
            from segplat.models.convert.ms2mnet import load_ms2mnet_pretrained

            self.load_report = load_ms2mnet_pretrained(self, pretrained)

    @property
    def aux_outputs(self) -> dict[str, float | None]:
        """The release's Vaihingen weights: f3 (stride 8) 0.3, f2 (stride 4) 0.2; none when aux_heads=false."""
        return {"f3": 0.3, "f2": 0.2} if self.aux_heads else {}

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        opt, dsm = inputs[self.opt_name], inputs[self.dsm_name]
        size = opt.shape[-2:]
        if dsm.shape[-2:] != size:
            dsm = F.interpolate(dsm, size=size, mode="bilinear", align_corners=False)
        rgb_maps = self.rgb_backbone(opt)
        dsm_maps = self.dsm_backbone(self.dfeBlock(dsm))
        fused = []
        for i, (r, d) in enumerate(zip(rgb_maps, dsm_maps), start=1):
            f = getattr(self, f"waseFusion{i}")(r, d)
            enhanced, _hidden = getattr(self, f"vfeBlock{i}")(f)
            fused.append(f + self.residual_rate * enhanced)
        aux = self.training and self.aux_heads
        logits, aux3, aux2 = self.decoder(*fused, aux=aux)
        out = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if aux:
            out["f3"], out["f2"] = aux3, aux2
        return out
