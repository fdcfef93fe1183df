"""Rough lung masks of a CT slice in the model's input range [0, 1].

`lungs`: Otsu's threshold separates dark (air, lung) from bright (body) pixels; the dark pixels
inside the body (its largest bright component, holes filled) are the lungs, so the air around
the patient and between the patient and the table is not; holes are filled again so that
nodules inside the lungs count. None when there are none (a slice below or above the lungs, an image
without the air around the patient, a crop).

`lung_region`: the lungs, or the whole slice where none are found (where active learning looks
for uncertainty).

`lung_field`: where a lung tumour can be: the lungs closed with a disk of radius ``closing_px``.
A tumour against the chest wall or the mediastinum is not a hole of the lung mask but a bite out
of its outline; closing fills bites up to about 2 x ``closing_px`` across, while the mediastinum
and the chest wall, wider than that, stay outside.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


def lungs(slice01: np.ndarray) -> np.ndarray | None:
    """(H, W) image in [0, 1] -> (H, W) bool lung mask, or None where no lung is found."""
    if float(slice01.max() - slice01.min()) < 1e-6:
        return None
    dark = slice01 < threshold_otsu(slice01)
    components, count = ndimage.label(~dark)
    if not count:
        return None
    body = components == 1 + np.argmax(np.bincount(components.ravel())[1:])
    inner = dark & ndimage.binary_fill_holes(body)
    return ndimage.binary_fill_holes(inner) if inner.any() else None


def lung_region(slice01: np.ndarray) -> np.ndarray:
    """(H, W) image in [0, 1] -> (H, W) bool lung mask (whole slice if no lung is found)."""
    found = lungs(slice01)
    return np.ones(slice01.shape, dtype=bool) if found is None else found


def lung_field(slice01: np.ndarray, closing_px: int, min_pixels: int) -> np.ndarray | None:
    """(H, W) image in [0, 1] -> (H, W) bool: the lungs closed by a disk of radius ``closing_px``;
    None when the lungs found cover fewer than ``min_pixels`` (no lung on this slice)."""
    found = lungs(slice01)
    if found is None or found.sum() < min_pixels:
        return None
    # closing by a disk = dilation then erosion, each a threshold of a Euclidean distance transform
    # (linear time, where a 21 x 21 structuring element costs most of a slice's post-processing); the
    # padding keeps the erosion from eating the field where the lungs come near the image border
    padded = np.pad(found, closing_px)
    dilated = ndimage.distance_transform_edt(~padded) <= closing_px
    closed = ndimage.distance_transform_edt(dilated) > closing_px
    return closed[closing_px:-closing_px, closing_px:-closing_px] | found
