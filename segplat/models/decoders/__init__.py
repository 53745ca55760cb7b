"""Decoders turn a (fused) feature pyramid into one feature map for the segmentation head."""

from segplat.models.decoders.aspp_gated import ASPPGatedDecoder
from segplat.models.decoders.deeplabv3plus import DeepLabV3PlusDecoder
from segplat.models.decoders.unet import UNetDecoder

__all__ = ["ASPPGatedDecoder", "DeepLabV3PlusDecoder", "UNetDecoder"]
