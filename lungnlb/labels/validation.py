"""Input checks shared by the label-derivation functions: a 2D finite image, a valid box, valid points."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = tuple[int, int, int, int]
Point = tuple[int, int]


def check_image(image: np.ndarray) -> np.ndarray:
    """Return `image` as a float64 (H, W) array; ValueError if it is not 2D, single-channel and finite."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"image must be a 2D single-channel array (H, W), got shape {array.shape}")
    if min(array.shape) < 2:
        raise ValueError(f"image must be at least 2x2 pixels, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"image must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    return array


def check_box(box: Sequence[float], shape: tuple[int, int]) -> Box:
    """Return `box` = (x_min, y_min, x_max, y_max) as ints (inclusive pixel columns/rows, PASCAL VOC).

    ValueError if it does not have four integral entries, if a minimum exceeds its maximum, or if
    any corner lies outside an image of `shape` = (H, W).
    """
    if len(box) != 4:
        raise ValueError(f"box must be (x_min, y_min, x_max, y_max), got {box!r}")
    if any(float(v) != int(v) for v in box):
        raise ValueError(f"box coordinates must be whole pixel indices, got {box!r}")
    x_min, y_min, x_max, y_max = (int(v) for v in box)
    if x_min > x_max or y_min > y_max:
        raise ValueError(f"box {box!r} has x_min > x_max or y_min > y_max")
    height, width = shape
    if x_min < 0 or y_min < 0 or x_max >= width or y_max >= height:
        raise ValueError(f"box {box!r} lies outside the image of {width} columns x {height} rows")
    return x_min, y_min, x_max, y_max


def check_points(points: Sequence[Sequence[int]], shape: tuple[int, int], name: str) -> list[Point]:
    """Return `points` as [(x, y), ...] ints; ValueError if one is malformed or outside an image of `shape`."""
    checked = []
    height, width = shape
    for point in points:
        if len(point) != 2:
            raise ValueError(f"{name} point must be (x, y), got {point!r}")
        x, y = (int(round(float(v))) for v in point)
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"{name} point {tuple(point)!r} lies outside the image of {width} x {height}")
        checked.append((x, y))
    return checked
