"""Dice overlap per class between a predicted and a reference label map.

``Dice_c = 2 |P_c ∩ R_c| / (|P_c| + |R_c|)``; a class absent from both maps has no Dice (NaN,
left out of means, as nnU-Net does). The mean Dice of a case is over its foreground classes.
"""
from __future__ import annotations

import numpy as np


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, label_values) -> np.ndarray:
    """Dice of every value in ``label_values`` (float64 array; NaN where neither map has it)."""
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"dice_per_class: prediction shape {prediction.shape} differs from the reference's "
                         f"{reference.shape}")
    scores = []
    for value in label_values:
        predicted, expected = prediction == value, reference == value
        denominator = int(predicted.sum()) + int(expected.sum())
        overlap = int(np.logical_and(predicted, expected).sum())
        scores.append(2 * overlap / denominator if denominator else float("nan"))
    return np.asarray(scores, dtype=np.float64)


def mean_foreground_dice(scores: np.ndarray) -> float:
    """Mean of the Dice scores that are defined (NaN if none is)."""
    scores = np.asarray(scores, dtype=np.float64)
    defined = scores[~np.isnan(scores)]
    return float(defined.mean()) if defined.size else float("nan")
