"""Marker-controlled watershed that turns a box or a few clicks on a CT slice into a nodule mask.

Steps (all on a crop around the box, so the cost does not grow with the slice size):

1. markers (see :mod:`lungnlb.labels.markers`): a core ellipse around the box centre is foreground,
   every pixel outside the box is background;
2. normalise the crop to the local contrast between background and object:
   ``u = clip((I - r) / (o - r), 0, ceiling) / ceiling`` with r = 25th percentile of the background
   marker (lung), o = 75th percentile of the core (nodule); brighter structures (chest wall, bone)
   saturate at the ceiling, so their edges do not dwarf the nodule's. HU, 8-bit windowed and
   pre-normalised slices give the same result (falls back to crop percentiles if o <= r);
3. smooth: ``s = G_sigma * u``;
4. dark level ``t = b + dark_fraction * (c - b)`` (b = median of s over the background marker,
   c = 75th percentile over the core): unmarked pixels below t become background (clear lung air
   needs no flooding), and the core shrinks to its largest connected part at or above t (a core
   larger than a small or eccentric nodule would otherwise force lung into the mask);
5. elevation ``E = |grad s| / max|grad s| + contrast_weight * |s - median(s[core])|``: boundaries are
   ridges of E, and pixels unlike the nodule (air, brighter pleura or bone) sit high;
6. :func:`skimage.segmentation.watershed` floods E from the markers;
7. open the foreground with a disk of ``opening_fraction`` of the box's shorter half-side (cuts thin
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
    background_percentile: percentile of the background marker taken as the background level r.
    object_percentile: percentile of the foreground marker taken as the object level o.
    contrast_ceiling: intensities above ``r + contrast_ceiling * (o - r)`` saturate.
    percentiles: (low, high) percentiles of the crop mapped to 0 and 1 when the object is not
        brighter than the background (o <= r), where the local contrast is undefined.
    sigma: Gaussian smoothing (pixels) before the gradient.
    contrast_weight: weight of the intensity distance to the core in the elevation image.
    core_fraction: semi-axes of the foreground core ellipse as a fraction of the box's half-sides.
    ring: background marker starts this many pixels outside the box.
    dark_fraction: pixels inside the box darker than ``b + dark_fraction * (c - b)`` (b = median of the
        background marker, c = 75th percentile of the core) are background markers too, and the core
        keeps only its largest connected part at or above that level; 0 disables both.
    opening_fraction: open the result with a disk of this fraction of the box's shorter half-side
        (cuts thin leaks along vessels and pleura); 0 disables.
    clip_to_box: drop foreground outside the box.
    """

    margin_fraction: float = 0.5
    min_margin: int = 4
    background_percentile: float = 25.0
    object_percentile: float = 75.0
    contrast_ceiling: float = 1.5
    percentiles: tuple[float, float] = (1.0, 99.0)
    sigma: float = 0.5
    contrast_weight: float = 1.0
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
    region, core = _segment(array[crop], markers, params, (y_max - y_min + 1, x_max - x_min + 1), shrink_core=True)
    if params.clip_to_box:
        region[: local_box[1]] = False
        region[local_box[3] + 1 :] = False
        region[:, : local_box[0]] = False
        region[:, local_box[2] + 1 :] = False
    centre = ((local_box[1] + local_box[3]) // 2, (local_box[0] + local_box[2]) // 2)
    region = _component_at(region, core, centre)
    if not region.any():
        warnings.warn(f"watershed found no object in box {tuple(box)}; returning the core marker", stacklevel=2)
        region = core
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
    region, _ = _segment(array[crop], markers, params, (hull[3] - hull[1] + 1, hull[2] - hull[0] + 1), shrink_core=False)
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


def _normalise(crop: np.ndarray, markers: np.ndarray, params: WatershedParams) -> np.ndarray | None:
    """Map the crop to [0, 1] by the local contrast between background and object markers.

    ``u = clip((I - r) / (o - r), 0, ceiling) / ceiling`` with r, o the background and object levels
    (percentiles of the raw crop under the markers). Falls back to mapping the crop's `percentiles` to
    0 and 1 when o <= r; None if the crop is flat.
    """
    outside = crop[markers == BACKGROUND]
    background = np.percentile(outside, params.background_percentile) if outside.size else np.inf
    level = np.percentile(crop[markers == FOREGROUND], params.object_percentile)
    if level > background:
        ceiling = params.contrast_ceiling
        return np.clip((crop - background) / (level - background), 0.0, ceiling) / ceiling
    low, high = np.percentile(crop, params.percentiles)
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


def _segment(
    crop: np.ndarray, markers: np.ndarray, params: WatershedParams, box_shape: tuple[int, int], shrink_core: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Watershed of the crop's elevation from `markers`.

    Returns the (h, w) bool foreground region and the (h, w) bool foreground marker actually used
    (the core after `_apply_dark_level` when `shrink_core`, else the given one).
    """
    core = markers == FOREGROUND
    unit = _normalise(crop, markers, params)
    if unit is None:
        return np.zeros(crop.shape, dtype=bool), core
    smooth = ndi.gaussian_filter(unit, params.sigma) if params.sigma > 0 else unit
    if params.dark_fraction > 0:
        markers = _apply_dark_level(smooth, markers, params.dark_fraction, shrink_core)
        core = markers == FOREGROUND
    surface = elevation(smooth, core, params.contrast_weight)
    region = watershed(surface, markers) == FOREGROUND
    radius = int(round(params.opening_fraction * min(box_shape) / 2))
    if radius > 0:
        region = ndi.binary_opening(region, structure=disk(radius)) | core
    return region, core


def _apply_dark_level(smooth: np.ndarray, markers: np.ndarray, dark_fraction: float, shrink_core: bool) -> np.ndarray:
    """Markers with the dark level ``t = b + dark_fraction * (c - b)`` applied.

    b = median of `smooth` over the background marker, c = its 75th percentile over the foreground
    marker. Unmarked pixels below t become background; with `shrink_core`, the foreground keeps only
    its largest connected part at or above t (its other pixels become unmarked, to be flooded).
    Unchanged when c <= b or there is no background marker.
    """
    core = markers == FOREGROUND
    if not (markers == BACKGROUND).any():
        return markers
    core_level = np.percentile(smooth[core], 75)
    background_level = np.median(smooth[markers == BACKGROUND])
    if core_level <= background_level:
        return markers
    threshold = background_level + dark_fraction * (core_level - background_level)
    marked = markers.copy()
    marked[(smooth < threshold) & (markers == 0)] = BACKGROUND
    if shrink_core:
        labels, _ = ndi.label(core & (smooth >= threshold))
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        marked[core & (labels != sizes.argmax())] = 0
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
