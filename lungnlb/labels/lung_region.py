"""A rough lung mask of a CT slice in the model's input range, to restrict uncertainty to the lungs.

Per slice: Otsu's threshold separates dark (air, lung) from bright (body) pixels; the dark
connected components that do not touch the image border are the lungs; holes are filled so that
nodules inside the lungs count. A slice where this finds nothing falls back to the whole slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


def lung_region(slice01: np.ndarray) -> np.ndarray:
    """(H, W) image in [0, 1] -> (H, W) bool lung mask (whole slice if no lung is found)."""
    if float(slice01.max() - slice01.min()) < 1e-6:
        return np.ones(slice01.shape, dtype=bool)
    dark = slice01 < threshold_otsu(slice01)
    components, count = ndimage.label(dark)
    border = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    inner = dark & ~np.isin(components, border)
    if not inner.any():
        return np.ones(slice01.shape, dtype=bool)
    return ndimage.binary_fill_holes(inner)

