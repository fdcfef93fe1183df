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

Both work on the bounding box of what they fill or close, with the result equal to that of the
whole frame (a slice is mostly air and chest wall, so the box is a fraction of the frame):
filling holes needs no margin, since every pixel on the box's edge that is not in the shape
touches the outside, which is not either; closing needs ``closing_px + 1`` pixels of margin, since
the dilation reaches ``closing_px`` beyond the shape and the erosion then sees a ring of
background all round, nearer to every pixel than anything beyond it.
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
    box = bounding_box(body)
    inner = dark[box] & fill_holes(body[box])
    if not inner.any():
        return None
    found = np.zeros(slice01.shape, dtype=bool)
    found[box] = fill_holes(inner)
    return found


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
    # margin may reach past the image: the field does not shrink where the lungs meet its border
    margin = closing_px + 1
    padded = np.pad(found, margin)
    rows, columns = bounding_box(padded)
    box = slice(rows.start - margin, rows.stop + margin), slice(columns.start - margin, columns.stop + margin)
    dilated = ndimage.distance_transform_edt(~padded[box]) <= closing_px
    closed = np.zeros_like(padded)
    closed[box] = ndimage.distance_transform_edt(dilated) > closing_px
    return closed[margin:-margin, margin:-margin] | found


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (H, W) bool with its holes filled, as `scipy.ndimage.binary_fill_holes` does: the
    4-connected components of the background that do not reach the border are holes. One labelling
    of the background instead of dilating the border inwards until nothing changes (it runs on
    every slice of a volume: `benchmarks/inference_speed.py`)."""
    background, count = ndimage.label(~mask)
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        outside[edge] = True
    outside[0] = False  # the mask itself
    return ~outside[background]


def bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """The (rows, columns) slices of the smallest box holding every True pixel of a non-empty ``mask``."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)
