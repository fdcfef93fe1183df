"""Overlap of two binary masks of one shape, the one Dice and IoU of the project:

    Dice = 2 |P ∩ G| / (|P| + |G|),   IoU = |P ∩ G| / |P ∪ G|,   both 1.0 when P and G are empty.
"""

from __future__ import annotations

import numpy as np


def dice_iou(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two masks (any array, read as bool); raises on a shape mismatch."""
    prediction, target = np.asarray(prediction, bool), np.asarray(target, bool)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from target shape {target.shape}")
    intersection = int(np.logical_and(prediction, target).sum())
    total = int(prediction.sum()) + int(target.sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * intersection / total, intersection / (total - intersection)


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of two masks (see `dice_iou`)."""
    return dice_iou(prediction, target)[0]
