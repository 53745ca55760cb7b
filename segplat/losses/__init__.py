"""Losses: single terms (ignore-index aware) and `SegLoss`, the weighted sum over terms and aux heads."""

from segplat.losses.composite import SegLoss
from segplat.losses.terms import CrossEntropyLoss

__all__ = ["CrossEntropyLoss", "SegLoss"]
