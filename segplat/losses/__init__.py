"""Losses: single terms (ignore-index aware) and `SegLoss`, the weighted sum over terms and aux heads."""

from segplat.losses.composite import SegLoss
from segplat.losses.terms import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LossTerm,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
    lovasz_grad,
)

__all__ = ["CrossEntropyLoss", "DiceLoss", "FocalLoss", "LossTerm", "LovaszSoftmaxLoss", "OhemCrossEntropyLoss",
           "SegLoss", "lovasz_grad"]
