"""Segmentation losses on logits ``[B, classes, x, y, z]`` and labels ``[B, x, y, z]``.

* ``"ce"``: cross-entropy, the paper's loss.
* ``"dice_ce"``: cross-entropy plus ``1 - soft Dice`` (nnU-Net's default): soft Dice per
  foreground class over the whole batch (``2 sum(p y) / (sum p + sum y)``, smoothed), averaged
  over the foreground classes. It weighs small structures like large ones.

Both are computed in float32 whatever the logits' dtype (autocast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "dice_ce")
DICE_SMOOTH = 1e-5


def soft_dice(logits: torch.Tensor, labels: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Mean over foreground classes of the batch soft Dice (a scalar in [0, 1])."""
    probabilities = logits.float().softmax(1)[:, 1:]
    one_hot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probabilities.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probabilities * one_hot).sum(dims)
    denominator = probabilities.sum(dims) + one_hot.sum(dims)
    return ((2 * intersection + smooth) / (denominator + smooth)).mean()


def segmentation_loss(name: str):
    """The loss function ``(logits, labels) -> scalar`` called ``name`` (one of :data:`LOSSES`)."""
    if name == "ce":
        return lambda logits, labels: F.cross_entropy(logits.float(), labels)
    if name == "dice_ce":
        return lambda logits, labels: F.cross_entropy(logits.float(), labels) + 1 - soft_dice(logits, labels)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
