"""Fusion: the spec a `conf/fusion` entry builds, and the modules that combine the streams' features."""

from segplat.models.fusion.spec import FusionSpec, StageFusion, resolve_fusion  # isort: skip
from segplat.models.fusion.attention import AttentionFusion
from segplat.models.fusion.concat import ConcatFusion
from segplat.models.fusion.cross_attention import CrossAttentionFusion
from segplat.models.fusion.film_gate import FiLMGateFusion

__all__ = ["AttentionFusion", "ConcatFusion", "CrossAttentionFusion", "FiLMGateFusion", "FusionSpec", "StageFusion",
           "resolve_fusion"]
