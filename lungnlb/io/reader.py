"""`read_image`: one entry point that picks the reader from the path.

* a folder -> DICOM series; ``*.dcm`` or a file starting with the DICOM preamble -> one DICOM slice;
* ``*.nii`` / ``*.nii.gz`` -> NIfTI; ``*.nrrd`` / ``*.nhdr`` -> NRRD; ``*.png`` / ``*.jpg`` /
  ``*.jpeg`` -> 8-bit raster.

For NIfTI/NRRD the intensity kind is the ``intensity`` argument, else ``"hu"`` when the image has
values below -200, ``"windowed8bit"`` when all values are integers in 0..255, ``"normalized"``
otherwise. An image of a prepared studies folder is read with its sidecar's kind by
`lungnlb.data.studies.read_study_image` (the folder layout is the data layer's, above this one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungnlb.io.dicom import read_dicom_file, read_dicom_series
from lungnlb.io.image import ImageData, ImageReadError
from lungnlb.io.raster import RASTER_SUFFIXES, read_raster
from lungnlb.io.volume import read_nifti, read_nrrd


def _has_dicom_preamble(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def guess_intensity(array: np.ndarray) -> str:
    """Intensity kind from the values alone (used only when nothing better is known)."""
    if array.size and float(array.min()) < -200.0:
        return "hu"
    if array.size and float(array.min()) >= 0 and float(array.max()) <= 255 and np.all(np.mod(array, 1) == 0):
        return "windowed8bit"
    return "normalized"


def read_image(path: str | Path, intensity: str | None = None) -> ImageData:
    """Read a DICOM series folder, a DICOM file, NIfTI, NRRD, PNG or JPEG into `ImageData`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        image = read_dicom_series(path)
    elif path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    elif path.name.lower().endswith((".nii", ".nii.gz")) or path.suffix.lower() in (".nrrd", ".nhdr"):
        reader = read_nrrd if path.suffix.lower() in (".nrrd", ".nhdr") else read_nifti
        image = reader(path, "hu")
        image.intensity = intensity or guess_intensity(image.array)
        return image
    elif path.suffix.lower() in RASTER_SUFFIXES:
        image = read_raster(path)
    elif path.suffix.lower() == ".dcm" or _has_dicom_preamble(path):
        image = read_dicom_file(path)
    else:
        raise ImageReadError(path, f"unsupported file type {path.suffix!r}: expected a DICOM folder/file, NIfTI, NRRD, PNG or JPEG")
    if intensity is not None and intensity != image.intensity:
        raise ValueError(f"{path}: this format's intensity is {image.intensity!r}, cannot read it as {intensity!r}")
    return image
