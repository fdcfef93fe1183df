"""What the LungNLB infer tasks share: the request's image, checked (and cached), and the result file."""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.conf import AppConfig
from lib.image_cache import ImageCache
from lib.errors import bad_request
from lib.images import load_image, study_intensity
from lungnlb.io import ImageData
from lungnlb.io.image import INTENSITY_KINDS
from lungnlb.io.volume import nifti_bytes


def requested_number(request: dict[str, Any], key: str, kind: str) -> float | None:
    """The request's `key` as a float, None when absent; 400 "<key> ... is not <kind>" when it is no number."""
    value = request.get(key)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise bad_request(f"{key} {value!r} is not {kind}") from error


def requested_slice(request: dict[str, Any]) -> int | None:
    """The request's `slice` as a whole number, None when absent; 400 when it is not one."""
    number = requested_number(request, "slice", "a whole number")
    if number is None:
        return None
    if not number.is_integer():
        raise bad_request(f"slice {request['slice']!r} is not a whole number")
    return int(number)


def requested_threshold(request: dict[str, Any], default: float) -> float:
    """The request's `threshold` in (0, 1), `default` when absent; 400 otherwise."""
    threshold = requested_number(request, "threshold", "a number")
    if threshold is None:
        return default
    if not 0.0 < threshold < 1.0:
        raise bad_request(f"threshold must lie in (0, 1), got {threshold}")
    return threshold


class LungInferTask(InferTask):
    """An InferTask whose request carries `image` (a checked path) and `image_id` (or None).

    `LungNLBApp.infer` resolves and checks the request's image before calling the task, so a task
    only reads it (4xx on unusable content; datastore images through the app's `ImageCache`) and
    writes its result to a temporary NIfTI file that MONAI Label streams back and deletes.
    """

    def __init__(self, app_config: AppConfig, images: ImageCache | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.app_config = app_config
        self.images = images

    def read(self, request: dict[str, Any]) -> ImageData:
        """The request's image; intensity from the request, else the study sidecar, else the reader.

        A datastore image comes from the cache while its file is unchanged (read-only array);
        uploads and absolute paths are read every time.
        """
        intensity = request.get("intensity") or study_intensity(self.app_config, request.get("image_id"))
        if intensity is not None and intensity not in INTENSITY_KINDS:
            raise bad_request(f"intensity {intensity!r} is not one of {', '.join(INTENSITY_KINDS)}")
        path = Path(request["image"])
        limit = self.app_config.max_image_size
        if self.images is None or request.get("image_id") is None:
            return load_image(path, intensity, limit)
        return self.images.get(path, intensity, lambda p, i: load_image(p, i, limit))

    @staticmethod
    def write_result(array: np.ndarray, affine: np.ndarray, dtype: type = np.uint8) -> Path:
        """Write a result in the image's geometry to a fresh temporary `.nii.gz` file and return its path.

        The header is `lungnlb.io.volume.nifti_image`'s (built once per geometry), as in every
        NIfTI file lungnlb writes. gzip level 1: a mask is mostly zeros and shrinks to a small
        fraction of its raw size, which pays on any real network. Nobody else sees the file until
        it is returned, so it is written in place.
        """
        content = gzip.compress(nifti_bytes(array, affine, dtype), compresslevel=1, mtime=0)
        handle, name = tempfile.mkstemp(prefix="lungnlb_", suffix=".nii.gz")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(content)
        except BaseException:
            os.remove(name)
            raise
        return Path(name)
