"""Measuring derived labels against reference masks: boxes from masks, box jitter, overlap scores and
the two naive baselines (the filled box and the ellipse inscribed in it)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import ellipse

from lungnlb.labels.validation import Box, check_box


def mask_components(mask: np.ndarray, min_pixels: int = 10) -> list[np.ndarray]:
    """The 8-connected components of a (H, W) bool mask with at least `min_pixels` pixels, as bool masks."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return [labels == k for k in range(1, count + 1) if sizes[k] >= min_pixels]


def bounding_box(mask: np.ndarray, pad: int = 0) -> Box:
    """Tight inclusive box (x_min, y_min, x_max, y_max) of a non-empty (H, W) mask, grown by `pad` and clipped."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("bounding_box of an empty mask")
    height, width = mask.shape
    return (
        max(int(cols.min()) - pad, 0),
        max(int(rows.min()) - pad, 0),
        min(int(cols.max()) + pad, width - 1),
        min(int(rows.max()) + pad, height - 1),
    )


def jitter_box(box: Box, shape: tuple[int, int], rng: np.random.Generator, fraction: float = 0.1) -> Box:
    """Move each edge independently by a uniform integer in [-j, j], j = max(1, round(fraction * side)).

    The result is clipped to an image of `shape` = (H, W) and re-ordered so that min <= max.
    """
    x_min, y_min, x_max, y_max = box
    jx = max(1, round(fraction * (x_max - x_min + 1)))
    jy = max(1, round(fraction * (y_max - y_min + 1)))
    xs = [int(np.clip(v + rng.integers(-jx, jx + 1), 0, shape[1] - 1)) for v in (x_min, x_max)]
    ys = [int(np.clip(v + rng.integers(-jy, jy + 1), 0, shape[0] - 1)) for v in (y_min, y_max)]
    return min(xs), min(ys), max(xs), max(ys)


def filled_box(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Baseline: the (H, W) bool mask of the whole box."""
    x_min, y_min, x_max, y_max = check_box(box, shape)
    mask = np.zeros(shape, dtype=bool)
    mask[y_min : y_max + 1, x_min : x_max + 1] = True
    return mask


def inscribed_ellipse(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Baseline: the (H, W) bool mask of the ellipse inscribed in the box (centre and half-sides of the box)."""
    x_min, y_min, x_max, y_max = check_box(box, shape)
    mask = np.zeros(shape, dtype=bool)
    rows, cols = ellipse((y_min + y_max) / 2, (x_min + x_max) / 2, (y_max - y_min + 1) / 2, (x_max - x_min + 1) / 2, shape)
    mask[rows, cols] = True
    return mask
