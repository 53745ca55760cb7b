"""Fusion modules: combine per-modality features at one pyramid stage (mid fusion)."""

from segplat.models.fusion.attention import AttentionFusion
from segplat.models.fusion.concat import ConcatFusion
from segplat.models.fusion.cross_attention import CrossAttentionFusion
from segplat.models.fusion.film_gate import FiLMGateFusion

__all__ = ["AttentionFusion", "ConcatFusion", "CrossAttentionFusion", "FiLMGateFusion"]
