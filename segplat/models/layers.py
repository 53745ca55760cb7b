"""Layers several models share. Normalisation, stochastic depth and squeeze-excite come from `timm.layers`
(`LayerNorm2d`, `DropPath`, `SEModule`); the conv + BatchNorm + activation block is here, as a plain
`nn.Sequential` (conv at index 0, BatchNorm next, then the activation), so state-dict keys stay `0.weight`,
`1.running_mean`, ... as in the U-Net, DeepLab and released MS2MNet layouts."""

from __future__ import annotations

from torch import nn


def conv_bn_act(cin: int, cout: int, k: int = 1, stride: int = 1, dilation: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU, bias: bool = False, separable: bool = False) -> nn.Sequential:
    """k x k conv (optionally strided, atrous, grouped, or depth-wise separable) + BatchNorm + activation.

    Padding keeps the size at stride 1 ("same" for odd k). `separable` (k > 1) is a depth-wise k x k conv then
    a point-wise 1x1 conv, one BatchNorm after both (the DeepLabV3+ / Xception form). `act=None` leaves the
    activation out (conv + BN).
    """
    pad = dilation * (k // 2)
    if separable and k > 1:
        convs: list[nn.Module] = [nn.Conv2d(cin, cin, k, stride, pad, dilation, groups=cin, bias=False),
                                  nn.Conv2d(cin, cout, 1, bias=bias)]
    else:
        convs = [nn.Conv2d(cin, cout, k, stride, pad, dilation, groups=groups, bias=bias)]
    return nn.Sequential(*convs, nn.BatchNorm2d(cout), *([act()] if act is not None else []))
