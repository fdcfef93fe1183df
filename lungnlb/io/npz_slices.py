"""The LIDC npz slice files: ``images`` (k, H, W) float32, ``masks`` (k, H, W) bool, ``names``,
``malignancy`` and ``is_cancer`` per slice.

The images are lung-masked (0 outside the lungs) and linearly normalised per scan by an earlier
pipeline, so their intensity is ``"normalized"`` (see `lungnlb.io.intensity` for the measured map
to HU). They carry no geometry: the affine is the standard axial one with 1 mm pixels and
``meta["spacing_known"]`` is False. The patient id is the file stem (e.g. ``LIDC-IDRI-0001``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungnlb.io.image import ImageData, ImageReadError, axial_affine

REQUIRED_KEYS = ("images", "masks")


@dataclass
class NpzSlice:
    """One slice of an npz file with its radiologist mask and ratings."""

    image: ImageData
    mask: np.ndarray
    name: str
    patient: str
    malignancy: int | None
    is_cancer: str | None


def _optional(values: np.ndarray | None, index: int) -> str | None:
    if values is None or index >= len(values):
        return None
    text = str(values[index]).strip()
    return text or None


def read_npz_slices(path: str | Path) -> list[NpzSlice]:
    """All slices of one npz file, in file order."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:
        raise ImageReadError(path, f"unreadable or corrupt npz file ({type(error).__name__}: {error})") from error
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise ImageReadError(path, f"npz slice file lacks {missing} (has {sorted(arrays)})")
    images, masks = arrays["images"], arrays["masks"]
    if images.ndim != 3 or images.shape != masks.shape:
        raise ImageReadError(path, f"wrong dimensionality: images {images.shape} and masks {masks.shape} must both be (k, H, W)")
    names = arrays.get("names")
    slices = []
    for i in range(len(images)):
        name = _optional(names, i) or f"{path.stem}_{i:03d}"
        malignancy = _optional(arrays.get("malignancy"), i)
        meta = {"source_files": [str(path)], "spacing_known": False, "npz_index": i, "name": name}
        slices.append(
            NpzSlice(
                image=ImageData(images[i], axial_affine((1.0, 1.0)), "normalized", meta),
                mask=masks[i].astype(bool),
                name=name,
                patient=path.stem,
                malignancy=int(malignancy) if malignancy and malignancy.isdigit() else None,
                is_cancer=_optional(arrays.get("is_cancer"), i),
            )
        )
    return slices
