"""Turn the `image` of a request or an upload into a checked `ImageData`, and write masks back.

Every problem becomes an HTTP error with a message (see `lib.errors`), raised before anything is
written: an id with path components (`../`), an unknown id, a path outside the allowed folders,
an empty or corrupt file, an image larger than `--conf max_image_size` (read from its header,
before the voxels), non-finite voxels, wrong dimensionality, a DICOM that is not CT, a label of
another grid.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from lib.conf import AppConfig
from lib.errors import bad_request, not_found, too_large, unprocessable
from lib.uploads import server_temp_dir
from lungnlb.data.studies import read_sidecar as read_study_sidecar
from lungnlb.io import ImageData, read_image, write_nifti

MIN_SIDE = 16  # smallest slice side the U-Net can sensibly take
# A new id or tag becomes a file or folder name: plain characters only, no leading dot (hidden,
# `.`, `.lungnlb`), no whitespace or control characters, short enough for any file system.
NEW_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_image_id(image_id: str) -> str:
    """Reject ids that are empty or could address anything outside the studies folder."""
    if not isinstance(image_id, str) or not image_id.strip():
        raise bad_request("no image id given")
    if "\x00" in image_id or ".." in Path(image_id).parts or "/" in image_id or "\\" in image_id:
        raise bad_request(f"image id {image_id!r} is not valid: ids are plain names without path components or '..'")
    return image_id


def check_new_image_id(image_id: str) -> str:
    """An id for a new image: also a safe file name (see `NEW_ID`)."""
    check_image_id(image_id)
    if not NEW_ID.fullmatch(image_id):
        raise bad_request(f"image id {image_id[:140]!r} is not valid: use 1-128 letters, digits, '.', '_', '+' or '-', "
                          "starting with a letter or digit")
    return image_id


def check_tag(tag: str) -> str:
    """A label tag (a folder name under `labels/`): see `TAG`."""
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise bad_request(f"label tag {str(tag)[:80]!r} is not valid: use 1-64 letters, digits, '_' or '-', "
                          "starting with a letter or digit (e.g. final)")
    return tag


def allowed_roots(config: AppConfig, extra: Iterable[Path] = ()) -> list[Path]:
    """Folders whose files a request may name by absolute path: the studies folder, the server's
    own upload folder, `extra` (the session folder) and `--conf allowed_paths`."""
    uploads = server_temp_dir()
    return [config.studies, *([uploads] if uploads else []), *extra, *config.allowed_paths]


def resolve_image(image: str, datastore, config: AppConfig, extra_roots: Iterable[Path] = ()) -> tuple[str | None, Path]:
    """`image` of a request -> (datastore id or None, file/folder path).

    A datastore id resolves through the datastore; an absolute path is accepted only inside the
    folders of `allowed_roots` (never the whole temporary folder: any user can write there).
    """
    if not isinstance(image, str) or not image:
        raise bad_request("no image given: pass a datastore image id or upload a file")
    if image in datastore.list_images():
        return image, Path(datastore.get_image_uri(image))
    if os.path.isabs(image):
        if "\x00" in image:
            raise bad_request("image path contains a NUL character")
        path = Path(os.path.realpath(image))
        if not any(path.is_relative_to(Path(root).resolve()) for root in allowed_roots(config, extra_roots)):
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
    try:
        return read_study_sidecar(config.studies, image_id) or {}
    except ValueError as error:  # not UTF-8, not JSON, or not an object
        raise unprocessable(f"sidecar of image {image_id!r} is unusable: {error}") from error


def study_intensity(config: AppConfig, image_id: str | None) -> str | None:
    """The `intensity` recorded in the study's sidecar `meta/<id>.json`, if any."""
    return read_sidecar(config, image_id).get("intensity")


def header_size(path: Path) -> tuple[int, int, int] | None:
    """(columns, rows, slices) of an image from its header alone — no voxel is decompressed;
    None when the header cannot be read (the reader then says why)."""
    name = path.name.lower()
    try:
        if path.is_dir():  # a DICOM series: one file per slice
            import pydicom

            files = [p for p in path.iterdir() if p.is_file()]
            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            return int(first.Columns), int(first.Rows), len(files)
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = tuple(int(v) for v in nib.load(path).shape)
        elif name.endswith((".nrrd", ".nhdr")):
            import nrrd

            shape = tuple(int(v) for v in nrrd.read_header(str(path))["sizes"])
        elif name.endswith((".png", ".jpg", ".jpeg")):
            from PIL import Image

            with Image.open(path) as raster:
                return raster.size[0], raster.size[1], 1
        else:
            import pydicom

            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            return int(dataset.Columns), int(dataset.Rows), int(getattr(dataset, "NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - any unreadable header is the reader's to report
        return None
    if len(shape) < 2:
        return None
    return shape[0], shape[1], math.prod(shape[2:])


def check_size(path: Path, max_size: tuple[int, int, int]) -> None:
    """413 when the header gives a larger image than `max_size` (columns, rows, slices)."""
    size = header_size(path)
    if size is not None and any(have > limit for have, limit in zip(size, max_size)):
        raise too_large(f"{path.name}: image of {size[0]} x {size[1]} x {size[2]} voxels (columns x rows x slices) "
                        f"is larger than this server accepts ({' x '.join(map(str, max_size))}; "
                        "--conf max_image_size)")


def load_image(path: Path, intensity: str | None = None, max_size: tuple[int, int, int] | None = None) -> ImageData:
    """Read and check an image (file or DICOM series folder); 4xx with a message if unusable.

    With `max_size` the header is checked first (see `check_size`)."""
    if path.is_file() and path.stat().st_size == 0:
        raise bad_request(f"{path.name}: the file is empty")
    if max_size is not None:
        check_size(path, max_size)
    try:
        image = read_image(path, intensity=intensity) if intensity else read_image(path)
    except FileNotFoundError as error:
        raise not_found(str(error)) from error
    except ValueError as error:  # ImageReadError: corrupt, non-CT DICOM, wrong dimensionality
        raise unprocessable(str(error)) from error
    if min(image.array.shape[-2:]) < MIN_SIDE:
        raise unprocessable(f"{path.name}: a slice of {image.array.shape[-2:]} pixels is too small (< {MIN_SIDE})")
    if image.array.dtype.kind == "f":
        bad = int(image.array.size - np.count_nonzero(np.isfinite(image.array)))
        if bad:
            raise unprocessable(f"{path.name}: {bad} of {image.array.size} voxels are not finite (NaN or infinity)")
    return image


def load_mask(path: Path, image: ImageData) -> np.ndarray:
    """Read an uploaded label, check it matches the image's grid, return it as a bool array."""
    if path.stat().st_size == 0:
        raise bad_request(f"label {path.name}: the file is empty")
    try:
        label = read_image(path, intensity="normalized")
    except ValueError as error:
        raise unprocessable(f"label {error}") from error
    array = label.array
    if _squeezed(array.shape) == _squeezed(image.array.shape):  # e.g. a 2D slice's label saved as H x W x 1
        array = array.reshape(image.array.shape)
    if array.shape != image.array.shape:
        raise unprocessable(f"label shape {label.array.shape} does not match the image shape {image.array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array != np.round(array)):
        raise unprocessable("label values must be non-negative integers (0 = background)")
    return array > 0


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(side for side in shape if side != 1)


def write_mask(path: Path, mask: np.ndarray, image: ImageData) -> Path:
    """Write a uint8 mask in the image's geometry (same array order and affine, 2D stays 2D)."""
    write_nifti(mask.astype(np.uint8), image.affine, path, dtype=np.uint8)
    return path


def write_image(path: Path, image: ImageData) -> Path:
    """Write an image as NIfTI in its own geometry (float32 values as read)."""
    write_nifti(image.array, image.affine, path)
    return path

