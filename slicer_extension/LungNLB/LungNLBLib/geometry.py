"""Slices of a volume and conversions between RAS millimetres (Slicer's markups) and pixel indices.

Conventions: arrays are ``(Z, Y, X)``; ``affine`` maps ``(x, y, z, 1)`` voxel indices to RAS. A box is
``(x_min, y_min, x_max, y_max)`` in inclusive pixel columns/rows (PASCAL VOC), as the server's
``lung_watershed`` task expects.
"""

from typing import List, Sequence, Tuple

import numpy as np

from .nifti import Volume


def as_volume(array: np.ndarray) -> np.ndarray:
    """View a ``(Y, X)`` slice as a one-slice ``(1, Y, X)`` volume; a 3D array is returned as is."""
    array = np.asarray(array)
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"expected a (Y, X) slice or a (Z, Y, X) volume, got shape {array.shape}")
    return array


def slice_affine(affine: np.ndarray, z: int) -> np.ndarray:
    """Affine of slice ``z`` as its own image: the same axes, the origin moved to that slice.

    ``A_z = A @ T(0, 0, z)``, so pixel ``(x, y)`` of the slice lands where voxel ``(x, y, z)`` was.
    """
    shift = np.eye(4)
    shift[2, 3] = float(z)
    return np.asarray(affine, dtype=np.float64) @ shift


def extract_slice(volume: Volume, z: int) -> Volume:
    """Slice ``z`` of a volume as a ``(Y, X)`` Volume with its own affine (a 2D image keeps z = 0 only)."""
    array = as_volume(volume.array)
    if not 0 <= z < array.shape[0]:
        raise ValueError(f"slice index {z} is outside the volume's {array.shape[0]} slices")
    return Volume(array=np.ascontiguousarray(array[z]), affine=slice_affine(volume.affine, z))


def ras_to_ijk(affine: np.ndarray, points_ras: Sequence[Sequence[float]]) -> np.ndarray:
    """Continuous voxel indices ``(N, 3)`` as ``(x, y, z)`` of RAS points ``(N, 3)``."""
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ homogeneous.T).T[:, :3]


def ijk_to_ras(affine: np.ndarray, points_ijk: Sequence[Sequence[float]]) -> np.ndarray:
    """RAS points ``(N, 3)`` of voxel indices ``(N, 3)`` given as ``(x, y, z)``."""
    points = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (np.asarray(affine, dtype=np.float64) @ homogeneous.T).T[:, :3]


def points_to_pixels(affine: np.ndarray, shape: Sequence[int], points_ras: Sequence[Sequence[float]]) -> Tuple[
    List[List[int]], int
]:
    """Pixel ``[[x, y], ...]`` of RAS points that lie on one slice, and that slice's index.

    Points are rounded to the nearest voxel; ValueError if a point is outside the ``(Z, Y, X)`` shape or
    the points are on different slices (the server's watershed works on one slice).
    """
    if len(points_ras) == 0:
        raise ValueError("no points given")
    ijk = np.rint(ras_to_ijk(affine, points_ras)).astype(int)
    _check_inside(ijk, shape)
    slices = sorted(set(ijk[:, 2].tolist()))
    if len(slices) != 1:
        raise ValueError(f"points lie on different slices {slices}; place them all on one slice")
    return ijk[:, :2].tolist(), slices[0]


def ras_box_to_pixel_box(
    affine: np.ndarray, shape: Sequence[int], corner_a_ras: Sequence[float], corner_b_ras: Sequence[float], z: int
) -> List[int]:
    """Inclusive pixel box ``[x_min, y_min, x_max, y_max]`` on slice ``z`` covering a RAS box's footprint.

    The eight corners of the axis-aligned RAS box are mapped to voxel space and their x/y extent taken,
    clipped to the image; ValueError if the box misses the image entirely or ``z`` is outside it.
    """
    depth, height, width = _zyx(shape)
    if not 0 <= z < depth:
        raise ValueError(f"slice index {z} is outside the volume's {depth} slices")
    low = np.minimum(corner_a_ras, corner_b_ras)
    high = np.maximum(corner_a_ras, corner_b_ras)
    corners = [[(low, high)[a][0], (low, high)[b][1], (low, high)[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    ijk = ras_to_ijk(affine, corners)
    x_min, y_min = np.floor(ijk[:, :2].min(axis=0) + 0.5).astype(int)
    x_max, y_max = np.ceil(ijk[:, :2].max(axis=0) - 0.5).astype(int)
    if x_max < 0 or y_max < 0 or x_min >= width or y_min >= height or x_max < x_min or y_max < y_min:
        raise ValueError(f"the box does not cover any pixel of the {width}x{height} image")
    return [int(max(x_min, 0)), int(max(y_min, 0)), int(min(x_max, width - 1)), int(min(y_max, height - 1))]


def _zyx(shape: Sequence[int]) -> Tuple[int, int, int]:
    """``(Z, Y, X)`` of a volume's or a slice's shape."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (1,) + shape  # type: ignore[return-value]
    if len(shape) != 3:
        raise ValueError(f"expected a (Y, X) or (Z, Y, X) shape, got {shape}")
    return shape  # type: ignore[return-value]


def _check_inside(ijk: np.ndarray, shape: Sequence[int]) -> None:
    depth, height, width = _zyx(shape)
    limits = np.array([width, height, depth])
    outside = np.any((ijk < 0) | (ijk >= limits), axis=1)
    if outside.any():
        raise ValueError(f"point(s) {ijk[outside].tolist()} (x, y, z) are outside the image of shape {tuple(shape)}")


def roi_to_pixel_box(
    affine: np.ndarray, shape: Sequence[int], object_to_ras: np.ndarray, size: Sequence[float], z: int
) -> List[int]:
    """Inclusive pixel box ``[x_min, y_min, x_max, y_max]`` of an ROI (a possibly rotated box) on slice ``z``.

    ``object_to_ras``: the ROI's 4x4 object-to-world matrix (its axes and centre, Slicer's
    ``GetObjectToWorldMatrix``); ``size``: its edge lengths in mm. The server's watershed takes an
    axis-aligned pixel box, so an ROI whose edges are not along the image's voxel axes is refused
    rather than replaced by its bounding box (which would segment more than the annotator drew).
    ValueError also for an empty ROI, one that does not cross slice ``z``, or one that misses the image.
    """
    depth, height, width = _zyx(shape)
    if not 0 <= z < depth:
        raise ValueError(f"slice index {z} is outside the volume's {depth} slices")
    size = np.asarray(size, dtype=np.float64)
    if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise ValueError(f"the box has no extent (size {size.tolist()} mm): draw it over the nodule first")
    object_to_ras = np.array(object_to_ras, dtype=np.float64)
    lengths = np.linalg.norm(object_to_ras[:3, :3], axis=0)
    if np.any(lengths == 0):
        raise ValueError("the box's orientation matrix is singular")
    object_to_ras[:3, :3] /= lengths  # unit axes: ``size`` already is in mm
    ras_to_ijk_matrix = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    object_to_ijk = ras_to_ijk_matrix @ object_to_ras
    for axis in range(3):
        direction = object_to_ijk[:3, axis]
        norm = np.linalg.norm(direction)
        if norm == 0 or np.sort(np.abs(direction) / norm)[-2] > 1e-3:
            raise ValueError(
                "the box is rotated relative to the image's slices; the watershed takes a box along the image's "
                "rows and columns: reset the box's rotation (Markups > ROI > Reset to default) and draw it again"
            )
    half = size / 2.0
    corners = np.array([[sx * half[0], sy * half[1], sz * half[2], 1.0] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    ijk = (object_to_ijk @ corners.T).T[:, :3]
    k_low, k_high = ijk[:, 2].min(), ijk[:, 2].max()
    if not k_low - 0.5 <= z <= k_high + 0.5:
        raise ValueError(
            f"the box spans slices {int(np.floor(k_low + 0.5))}..{int(np.ceil(k_high - 0.5))}, not the slice {z} shown: "
            "scroll to the box or draw it on this slice"
        )
    x_min, y_min = np.floor(ijk[:, :2].min(axis=0) + 0.5).astype(int)
    x_max, y_max = np.ceil(ijk[:, :2].max(axis=0) - 0.5).astype(int)
    if x_max < 0 or y_max < 0 or x_min >= width or y_min >= height or x_max < x_min or y_max < y_min:
        raise ValueError(f"the box does not cover any pixel of the {width}x{height} image")
    return [int(max(x_min, 0)), int(max(y_min, 0)), int(min(x_max, width - 1)), int(min(y_max, height - 1))]


def slice_normal_alignment(affine: np.ndarray, slice_to_ras: np.ndarray) -> float:
    """|cos| of the angle between a slice view's normal and the image's slice axis (1 when the view shows image slices)."""
    normal = np.asarray(slice_to_ras, dtype=np.float64)[:3, 2]
    k_axis = np.asarray(affine, dtype=np.float64)[:3, 2]
    return float(abs(normal @ k_axis) / (np.linalg.norm(normal) * np.linalg.norm(k_axis)))
