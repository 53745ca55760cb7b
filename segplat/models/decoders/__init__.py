"""Decoders turn a (fused) feature pyramid into one feature map for the segmentation head."""

from segplat.models.decoders.unet import UNetDecoder

__all__ = ["UNetDecoder"]
