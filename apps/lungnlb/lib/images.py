"""Turn the `image` of a request or an upload into a checked `ImageData`, and write masks back.

Every problem becomes an HTTP error with a message (see `lib.errors`), raised before anything is
written: an id with path components (`../`), an unknown id, a path outside the allowed folders,
an empty or corrupt file, wrong dimensionality, a DICOM that is not CT.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from lib.conf import AppConfig
from lib.errors import bad_request, not_found, unprocessable
from lungnlb.io import ImageData, read_image, write_nifti

MIN_SIDE = 16  # smallest slice side the U-Net can sensibly take


def check_image_id(image_id: str) -> str:
    """Reject ids that are empty or could address anything outside the studies folder."""
    if not isinstance(image_id, str) or not image_id.strip():
        raise bad_request("no image id given")
    if "\x00" in image_id or ".." in Path(image_id).parts or "/" in image_id or "\\" in image_id:
        raise bad_request(f"image id {image_id!r} is not valid: ids are plain names without path components or '..'")
    return image_id


def _allowed_roots(config: AppConfig) -> list[Path]:
    return [config.studies, Path(tempfile.gettempdir()).resolve(), *config.allowed_paths]


def resolve_image(image: str, datastore, config: AppConfig) -> tuple[str | None, Path]:
    """`image` of a request -> (datastore id or None, file/folder path).

    A datastore id resolves through the datastore; an absolute path is accepted only inside the
    studies folder, the temporary folder (uploads) or `--conf allowed_paths`.
    """
    if not isinstance(image, str) or not image:
        raise bad_request("no image given: pass a datastore image id or upload a file")
    if image in datastore.list_images():
        return image, Path(datastore.get_image_uri(image))
    if os.path.isabs(image):
        path = Path(os.path.realpath(image))
        if not any(path.is_relative_to(root) for root in _allowed_roots(config)):
            raise bad_request(f"image path {image} is outside the folders this server may read")
        if not path.exists():
            raise not_found(f"image path {image} does not exist")
        return None, path
    check_image_id(image)
    raise not_found(f"image id {image!r} is not in the datastore")


SIDECAR_INFO_KEYS = ("intensity", "source", "case", "class_label", "label_method", "labelled_slices",
                     "slice_class_labels", "malignancy", "readers", "attribution")


def read_sidecar(config: AppConfig, image_id: str | None) -> dict:
    """The study's sidecar `meta/<id>.json` ({} when there is none); 422 when it is not a JSON object."""
    if image_id is None:
        return {}
    sidecar = config.studies / "meta" / f"{image_id}.json"
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise unprocessable(f"sidecar {sidecar.name} of image {image_id!r} is not valid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise unprocessable(f"sidecar {sidecar.name} of image {image_id!r} is not a JSON object")
    return meta


def study_intensity(config: AppConfig, image_id: str | None) -> str | None:
    """The `intensity` recorded in the study's sidecar `meta/<id>.json`, if any."""
    return read_sidecar(config, image_id).get("intensity")


def load_image(path: Path, intensity: str | None = None) -> ImageData:
    """Read and check an image (file or DICOM series folder); 4xx with a message if unusable."""
    if path.is_file() and path.stat().st_size == 0:
        raise bad_request(f"{path.name}: the file is empty")
    try:
        image = read_image(path, intensity=intensity) if intensity else read_image(path)
    except FileNotFoundError as error:
        raise not_found(str(error)) from error
    except ValueError as error:  # ImageReadError: corrupt, non-CT DICOM, wrong dimensionality
        raise unprocessable(str(error)) from error
    if min(image.array.shape[-2:]) < MIN_SIDE:
        raise unprocessable(f"{path.name}: a slice of {image.array.shape[-2:]} pixels is too small (< {MIN_SIDE})")
    return image


def load_mask(path: Path, image: ImageData) -> np.ndarray:
    """Read an uploaded label, check it matches the image's grid, return it as a bool array."""
    if path.stat().st_size == 0:
        raise bad_request(f"label {path.name}: the file is empty")
    try:
        label = read_image(path, intensity="normalized")
    except ValueError as error:
        raise unprocessable(f"label {error}") from error
    array = label.array.reshape(image.array.shape) if label.array.size == image.array.size else label.array
    if array.shape != image.array.shape:
        raise unprocessable(f"label shape {label.array.shape} does not match the image shape {image.array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array != np.round(array)):
        raise unprocessable("label values must be non-negative integers (0 = background)")
    return array > 0


def write_mask(path: Path, mask: np.ndarray, image: ImageData) -> Path:
    """Write a uint8 mask in the image's geometry (same array order and affine, 2D stays 2D)."""
    write_nifti(mask.astype(np.uint8), image.affine, path, dtype=np.uint8)
    return path


def write_image(path: Path, image: ImageData) -> Path:
    """Write an image as NIfTI in its own geometry (float32 values as read)."""
    write_nifti(image.array, image.affine, path)
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A∩B| / (|A|+|B|) of two bool masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total
