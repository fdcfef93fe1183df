"""Marker-controlled watershed that turns a box or a few clicks on a CT slice into a nodule mask.

Steps (all on a crop around the box, so the cost does not grow with the slice size):

1. normalise the crop robustly: ``u = clip((I - p_lo) / (p_hi - p_lo), 0, 1)`` with percentiles of the
   crop, so HU, 8-bit windowed and pre-normalised slices give the same result;
2. smooth: ``s = G_sigma * u``;
3. markers (see :mod:`lungnlb.labels.markers`): a core ellipse around the box centre is foreground,
   every pixel outside the box is background, and so is every pixel inside the box darker than
   ``b + dark_fraction * (c - b)`` (b = median of the background, c = 75th percentile of the core):
   clear lung air needs no flooding;
4. elevation ``E = |grad s| / max|grad s| + contrast_weight * |s - median(s[core])|``: boundaries are
   ridges of E, and pixels unlike the nodule (air, brighter pleura or bone) sit high;
5. :func:`skimage.segmentation.watershed` floods E from the markers;
6. open the foreground with a disk of ``opening_fraction`` of the box's shorter half-side (cuts thin
   leaks along vessels), clip to the box, keep the component that holds the centre, fill holes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk
from skimage.segmentation import watershed

from lungnlb.labels.markers import BACKGROUND, FOREGROUND, box_markers, point_markers
from lungnlb.labels.validation import Box, check_box, check_image, check_points


@dataclass(frozen=True)
class WatershedParams:
    """Parameters of :func:`box_to_mask` (defaults tuned on LIDC radiologist masks, see docs/labels.md).

    margin_fraction: the crop extends this fraction of the box's longer side beyond each edge.
    min_margin: ... but at least this many pixels.
    percentiles: (low, high) percentiles of the crop mapped to 0 and 1.
    sigma: Gaussian smoothing (pixels) before the gradient.
    contrast_weight: weight of the intensity distance to the core in the elevation image.
    core_fraction: semi-axes of the foreground core ellipse as a fraction of the box's half-sides.
    ring: background marker starts this many pixels outside the box.
    dark_fraction: pixels inside the box darker than ``b + dark_fraction * (c - b)`` (b = median of the
        background ring, c = level of the core) are background markers too; 0 disables.
    opening_fraction: open the result with a disk of this fraction of the box's shorter half-side
        (cuts thin leaks along vessels and pleura); 0 disables.
    clip_to_box: drop foreground outside the box.
    """

    margin_fraction: float = 0.5
    min_margin: int = 4
    percentiles: tuple[float, float] = (1.0, 99.0)
    sigma: float = 0.5
    contrast_weight: float = 0.5
    core_fraction: float = 0.5
    ring: int = 1
    dark_fraction: float = 0.3
    opening_fraction: float = 0.1
    clip_to_box: bool = True

    def as_dict(self) -> dict:
        """The parameters as a JSON-friendly dict (for label provenance)."""
        return asdict(self)


def box_to_mask(image: np.ndarray, box: Sequence[int], params: WatershedParams | None = None) -> np.ndarray:
    """Segment the object inside a PASCAL VOC box with a marker-controlled watershed.

    Args:
        image: (H, W) single-channel slice of any intensity scale (HU, 8-bit windowed, normalised float).
        box: (x_min, y_min, x_max, y_max) inclusive pixel columns and rows.
        params: algorithm parameters; the documented defaults when None.

    Returns:
        (H, W) bool mask; True inside the object. Never empty: if the watershed finds nothing
        (e.g. a flat image), the core marker is returned with a warning.
    """
    params = params or WatershedParams()
    array = check_image(image)
    x_min, y_min, x_max, y_max = check_box(box, array.shape)
    crop, (row0, col0) = _crop_around(array.shape, (x_min, y_min, x_max, y_max), params)
    local_box = (x_min - col0, y_min - row0, x_max - col0, y_max - row0)
    markers = box_markers(crop_shape(crop), local_box, params.core_fraction, params.ring)
    region = _segment(array[crop], markers, params, (y_max - y_min + 1, x_max - x_min + 1))
    if params.clip_to_box:
        region[: local_box[1]] = False
        region[local_box[3] + 1 :] = False
        region[:, : local_box[0]] = False
        region[:, local_box[2] + 1 :] = False
    centre = ((local_box[1] + local_box[3]) // 2, (local_box[0] + local_box[2]) // 2)
    region = _component_at(region, markers == FOREGROUND, centre)
    if not region.any():
        warnings.warn(f"watershed found no object in box {tuple(box)}; returning the core marker", stacklevel=2)
        region = markers == FOREGROUND
    mask = np.zeros(array.shape, dtype=bool)
    mask[crop] = region
    return mask


def points_to_mask(
    image: np.ndarray,
    foreground: Sequence[Sequence[int]],
    background: Sequence[Sequence[int]] = (),
    params: WatershedParams | None = None,
) -> np.ndarray:
    """Segment the object marked by foreground clicks, bounded by background clicks.

    Args:
        image: (H, W) single-channel slice of any intensity scale.
        foreground: [(x, y), ...] clicks inside the object (at least one).
        background: [(x, y), ...] clicks outside it; with none, the crop's border is background.
        params: algorithm parameters (``core_fraction`` and ``clip_to_box`` are unused).

    Returns:
        (H, W) bool mask: the components of the watershed foreground that hold a foreground click,
        holes filled. Never empty: at worst the clicked pixels themselves, with a warning.
    """
    params = params or WatershedParams()
    array = check_image(image)
    fg = check_points(foreground, array.shape, "foreground")
    bg = check_points(background, array.shape, "background")
    if not fg:
        raise ValueError("points_to_mask needs at least one foreground point")
    if set(fg) & set(bg):
        raise ValueError(f"points {sorted(set(fg) & set(bg))} are marked both foreground and background")
    xs, ys = [p[0] for p in fg + bg], [p[1] for p in fg + bg]
    hull = (min(xs), min(ys), max(xs), max(ys))
    crop, (row0, col0) = _crop_around(array.shape, hull, params)
    markers = point_markers(crop_shape(crop), [(x - col0, y - row0) for x, y in fg], [(x - col0, y - row0) for x, y in bg])
    region = _segment(array[crop], markers, params, (hull[3] - hull[1] + 1, hull[2] - hull[0] + 1))
    seeds = markers == FOREGROUND
    labels, _ = ndi.label(region)
    keep = np.unique(labels[seeds & region])
    region = ndi.binary_fill_holes(np.isin(labels, keep[keep > 0]))
    if not region.any():
        warnings.warn("watershed found no object at the foreground points; returning the points", stacklevel=2)
        region = seeds
    mask = np.zeros(array.shape, dtype=bool)
    mask[crop] = region
    return mask


def crop_shape(crop: tuple[slice, slice]) -> tuple[int, int]:
    """(rows, columns) of a 2D slice tuple with explicit bounds."""
    return crop[0].stop - crop[0].start, crop[1].stop - crop[1].start


def _crop_around(shape: tuple[int, int], box: Box, params: WatershedParams) -> tuple[tuple[slice, slice], tuple[int, int]]:
    """Slices of the box grown by the margin (clipped to the image) and the crop's top-left (row, col)."""
    x_min, y_min, x_max, y_max = box
    longer = max(x_max - x_min, y_max - y_min) + 1
    margin = max(params.min_margin, int(round(params.margin_fraction * longer)))
    row0, col0 = max(y_min - margin, 0), max(x_min - margin, 0)
    row1, col1 = min(y_max + margin + 1, shape[0]), min(x_max + margin + 1, shape[1])
    return (slice(row0, row1), slice(col0, col1)), (row0, col0)


def _normalise(crop: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray | None:
    """Map the crop's low/high percentiles to 0/1 (clipped); None if the crop is flat."""
    low, high = np.percentile(crop, percentiles)
    if high <= low:
        low, high = crop.min(), crop.max()
    if high <= low:
        return None
    return np.clip((crop - low) / (high - low), 0.0, 1.0)


def elevation(smooth: np.ndarray, core: np.ndarray, contrast_weight: float) -> np.ndarray:
    """Elevation image E = |grad s| / max|grad s| + contrast_weight * |s - median(s[core])|.

    Args:
        smooth: (h, w) smoothed crop normalised to [0, 1].
        core: (h, w) bool foreground marker whose median intensity is the object's level.
        contrast_weight: weight of the intensity-distance term.
    """
    gradient = np.hypot(ndi.sobel(smooth, axis=0), ndi.sobel(smooth, axis=1))
    gradient /= max(gradient.max(), 1e-12)
    if contrast_weight == 0:
        return gradient
    return gradient + contrast_weight * np.abs(smooth - np.median(smooth[core]))


def _segment(crop: np.ndarray, markers: np.ndarray, params: WatershedParams, box_shape: tuple[int, int]) -> np.ndarray:
    """Watershed of the crop's elevation from `markers`; returns the (h, w) bool foreground region."""
    unit = _normalise(crop, params.percentiles)
    if unit is None:
        return np.zeros(crop.shape, dtype=bool)
    smooth = ndi.gaussian_filter(unit, params.sigma) if params.sigma > 0 else unit
    core = markers == FOREGROUND
    if params.dark_fraction > 0:
        markers = _mark_dark(smooth, markers, params.dark_fraction)
    surface = elevation(smooth, core, params.contrast_weight)
    region = watershed(surface, markers) == FOREGROUND
    radius = int(round(params.opening_fraction * min(box_shape) / 2))
    if radius > 0:
        region = ndi.binary_opening(region, structure=disk(radius)) | core
    return region


def _mark_dark(smooth: np.ndarray, markers: np.ndarray, dark_fraction: float) -> np.ndarray:
    """Add unmarked pixels darker than ``b + dark_fraction * (c - b)`` to the background marker."""
    core_level = np.percentile(smooth[markers == FOREGROUND], 75)
    background_level = np.median(smooth[markers == BACKGROUND])
    if core_level <= background_level:
        return markers
    dark = smooth < background_level + dark_fraction * (core_level - background_level)
    marked = markers.copy()
    marked[dark & (markers == 0)] = BACKGROUND
    return marked


def _component_at(region: np.ndarray, core: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    """The connected component of `region` that holds `centre` (else the largest touching `core`), holes filled."""
    labels, count = ndi.label(region)
    if count == 0:
        return region
    label = labels[centre]
    if label == 0:
        touching = labels[core & region]
        if touching.size == 0:
            return np.zeros_like(region)
        label = np.bincount(touching).argmax()
    return ndi.binary_fill_holes(labels == label)
