"""`lung_watershed`: interactive mask from a box or clicks with the paper's marker-controlled watershed.

Request parameters (pixel coordinates of the image array: x = column, y = row, z = slice; this is
the voxel (i, j, k) order of the NIfTI file, the order 3D Slicer's MONAI Label client sends):

    box          [x_min, y_min, x_max, y_max] inclusive (PASCAL VOC), or
    roi          [i_min, i_max, j_min, j_max, k_min, k_max]: the box of Slicer's official MONAI Label
                 module (its ROI prompt, `getROIPointsXYZ`: each pair is the voxel index of the ROI's
                 RAS corners, so a pair may come reversed on a flipped axis; i = x, j = y, k = z), or
    foreground   [[x, y], ...] or [[x, y, z], ...] clicks inside the object,
    background   [[x, y], ...] or [[x, y, z], ...] clicks outside it (optional),
    slice        z of the slice to segment for a volume (else the clicks' z; 0 for a 2D image)

A box (`box`, else `roi`) wins over clicks. With `roi`, the slice is `slice` when it lies in the ROI's
k range, else the middle of that range (the official module sends the Red view's offset in mm as
`slice` when only the ROI is placed).

Result image: uint8 mask of the image's shape and geometry, non-zero only on that slice.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from lib.conf import AppConfig
from lib.errors import bad_request, unprocessable
from lib.image_cache import ImageCache
from lib.infers.base import LungInferTask, requested_slice
from lungnlb.labels import box_to_mask, points_to_mask
from monailabel.interfaces.tasks.infer_v2 import InferType


class WatershedInfer(LungInferTask):
    """Box / click -> nodule mask on one slice (no model, always available)."""

    def __init__(self, config: AppConfig, images: ImageCache | None = None):
        super().__init__(
            config,
            images,
            type=InferType.DEEPGROW,
            labels={"tumour": 1},
            dimension=2,
            description="Marker-controlled watershed from a box or foreground/background clicks (paper §IV.A)",
            # no list values and no click keys: Slicer's official MONAI Label module sends v[0] of each
            # listed config value (IndexError on an empty list) and lets config values replace its clicks
            config={"slice": ""},
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        image = self.read(request)
        volume = image.array if image.array.ndim == 3 else image.array[None]
        box = _box(request.get("box"))
        foreground = _points(request.get("foreground"), "foreground")
        background = _points(request.get("background"), "background")
        roi = None if box else _roi(request.get("roi"))
        if roi is not None:
            box, z = roi[0], _roi_slice(request, roi[1], volume.shape[0])
        else:
            z = _slice_index(request, foreground + background, volume.shape[0])
        plane = volume[z]
        try:
            if box:
                mask2d = box_to_mask(plane, box)
            elif foreground:
                mask2d = points_to_mask(plane, [p[:2] for p in foreground], [p[:2] for p in background])
            else:
                raise bad_request("lung_watershed needs a 'box' [x_min, y_min, x_max, y_max], an 'roi' "
                              "[i_min, i_max, j_min, j_max, k_min, k_max] or 'foreground' points")
        except (ValueError, TypeError) as error:
            raise unprocessable(f"lung_watershed: {error}") from error
        mask = np.zeros(volume.shape, dtype=bool)
        mask[z] = mask2d
        path = self.write_result(mask.reshape(image.array.shape), image.affine)
        return str(path), {
            "slice": z,
            "method": "box" if box else "points",
            "box": box or None,
            "mask_pixels": int(mask2d.sum()),
            "latencies": {"total": round(time.perf_counter() - start, 4)},
        }


def _coordinate(value: Any) -> int:
    """A pixel coordinate: a finite number, rounded (TypeError / ValueError / OverflowError otherwise)."""
    number = float(value)
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return int(round(number))


def _box(value: Any) -> list[int]:
    if not value:
        return []
    try:
        if len(value) != 4 or isinstance(value, (str, bytes, dict)):
            raise ValueError("not 4 numbers")
        return [_coordinate(v) for v in value]
    except (TypeError, ValueError, OverflowError) as error:
        raise bad_request(f"box must be [x_min, y_min, x_max, y_max] of finite numbers, got {value!r}") from error


def _roi(value: Any) -> tuple[list[int], tuple[int, int]] | None:
    """The official module's `roi` -> ([x_min, y_min, x_max, y_max], (k_min, k_max)); None when absent."""
    if not value:
        return None
    try:
        if len(value) != 6 or isinstance(value, (str, bytes, dict)):
            raise ValueError("not 6 numbers")
        i0, i1, j0, j1, k0, k1 = (_coordinate(v) for v in value)
    except (TypeError, ValueError, OverflowError) as error:
        raise bad_request(f"roi must be [i_min, i_max, j_min, j_max, k_min, k_max] of finite numbers, got {value!r}") from error
    return [min(i0, i1), min(j0, j1), max(i0, i1), max(j0, j1)], (min(k0, k1), max(k0, k1))


def _roi_slice(request: dict[str, Any], k_range: tuple[int, int], depth: int) -> int:
    """`slice` when it lies in the ROI's k range (and the image), else the middle of that range."""
    low, high = max(k_range[0], 0), min(k_range[1], depth - 1)
    if low > high:
        raise bad_request(f"roi slices {k_range[0]}..{k_range[1]} lie outside the image's {depth} slice(s)")
    z = requested_slice(request)
    return z if z is not None and low <= z <= high else (low + high) // 2


def _points(value: Any, name: str) -> list[list[int]]:
    if not value:
        return []
    try:
        if isinstance(value, (str, bytes, dict)):
            raise ValueError("not a list")
        points = [[_coordinate(c) for c in point] for point in value]
    except (TypeError, ValueError, OverflowError) as error:
        raise bad_request(f"{name} must be a list of [x, y] or [x, y, z] points of finite numbers, got {value!r}") from error
    if any(len(p) not in (2, 3) for p in points):
        raise bad_request(f"{name} points need 2 or 3 coordinates, got {value!r}")
    return points


def _slice_index(request: dict[str, Any], points: list[list[int]], depth: int) -> int:
    """The slice to segment: `slice`, else the z of the clicks (all on one slice), else 0."""
    z = requested_slice(request)
    if z is None:
        zs = {p[2] for p in points if len(p) == 3}
        if len(zs) > 1:
            raise bad_request(f"clicks lie on several slices {sorted(zs)}; give 'slice' or click on one slice")
        z = zs.pop() if zs else 0
    if not 0 <= z < depth:
        raise bad_request(f"slice {z} is outside the image's {depth} slice(s)")
    return z
