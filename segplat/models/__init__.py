"""Models: encoders, fusion modules, decoders, the generic Segmenter and named architectures."""

from segplat.models.base import SegmentationModel
from segplat.models.segmenter import Segmenter

__all__ = ["SegmentationModel", "Segmenter"]
