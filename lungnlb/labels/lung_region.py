"""A rough lung mask of a CT slice in the model's input range: where the app's uncertainty is
measured, and the box a native-resolution model's sliding window covers (`lung_box`).

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


def lung_box(slice01: np.ndarray, margin: int, min_fraction: float = 0.01) -> tuple[slice, slice] | None:
    """The bounding box of the lungs of an (H, W) slice, widened by ``margin`` pixels on every side
    (nodules on the pleura or the mediastinum lie at the lungs' edge), or None when no lung region
    of at least ``min_fraction`` of the slice is found (a nodule crop, a slice above the lungs: the
    caller keeps its wider region)."""
    lungs = lung_region(slice01)
    if lungs.all() or lungs.sum() < min_fraction * lungs.size:
        return None
    rows, columns = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    height, width = lungs.shape
    return (slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
            slice(max(0, columns[0] - margin), min(width, columns[-1] + 1 + margin)))
