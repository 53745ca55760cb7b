"""Encoders return a feature pyramid (list of maps, coarsest last) and say its channels and strides."""

from segplat.models.encoders.timm_encoder import TimmEncoder

__all__ = ["TimmEncoder"]
