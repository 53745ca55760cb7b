"""Fusion modules: combine per-modality features at one pyramid stage (mid fusion)."""

from segplat.models.fusion.concat import ConcatFusion

__all__ = ["ConcatFusion"]
