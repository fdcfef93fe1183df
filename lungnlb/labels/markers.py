"""Watershed markers from a box (core ellipse = object, outside the box = background) or from clicks."""

from __future__ import annotations

import numpy as np

from lungnlb.labels.validation import Box, Point

BACKGROUND = 2
FOREGROUND = 1


def box_markers(shape: tuple[int, int], box: Box, core_fraction: float, ring: int) -> np.ndarray:
    """Marker image for a box inside a crop of `shape` = (h, w).

    The foreground (1) is the ellipse centred on the box centre with semi-axes
    ``core_fraction * (half-width, half-height)`` (at least the centre pixel); the background (2) is
    every pixel at least `ring` pixels outside the box; 0 elsewhere (to be flooded).
    """
    x_min, y_min, x_max, y_max = box
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (y_min + y_max) / 2, (x_min + x_max) / 2
    ry = max(core_fraction * (y_max - y_min + 1) / 2, 0.5)
    rx = max(core_fraction * (x_max - x_min + 1) / 2, 0.5)
    markers = np.zeros(shape, dtype=np.int32)
    outside = (rows < y_min - ring + 1) | (rows > y_max + ring - 1) | (cols < x_min - ring + 1) | (cols > x_max + ring - 1)
    markers[outside] = BACKGROUND
    core = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
    core[int(cy), int(cx)] = True
    markers[core] = FOREGROUND
    return markers


def point_markers(shape: tuple[int, int], foreground: list[Point], background: list[Point]) -> np.ndarray:
    """Marker image with the clicked pixels; without background clicks the crop border is background."""
    markers = np.zeros(shape, dtype=np.int32)
    if background:
        for x, y in background:
            markers[y, x] = BACKGROUND
    else:
        markers[[0, -1], :] = BACKGROUND
        markers[:, [0, -1]] = BACKGROUND
    for x, y in foreground:
        markers[y, x] = FOREGROUND
    return markers
