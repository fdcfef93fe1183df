"""The LIDC nodule crop files (``lidc-nodules/crops``): one ``.npz`` per patient, named by patient id.

Arrays, one row per crop (an axial slice cut around a nodule):

* ``image`` uint8 (N, H, W): 8-bit grey levels of the publisher's unknown window (intensity
  ``"crops8bit"``, mapped to HU in `lungnlb.io.intensity`);
* ``masks`` bool (N, R, H, W): the outline of each of up to R = 4 LIDC readers, one channel each. An
  empty channel means that reader did not mark the nodule on that slice; a channel is not the same
  radiologist from one patient to the next, so channels are only compared within a nodule;
* ``nodule`` (N,): the nodule number within the patient; ``slice`` (N,): the slice number within that
  nodule's stack.

`read_crop_file` groups the rows by nodule into one `NoduleCrop` each: a (n_slices, H, W) stack in
``slice`` order. The publisher gives no spacing: the affine is the standard axial one with nominal
1 mm voxels and ``meta["spacing_known"]`` is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungnlb.io.image import ImageData, ImageReadError, axial_affine

CROP_KEYS = ("image", "masks", "nodule", "slice")
# The arrays that identify the format even when ``masks`` is missing (then it is a broken crop
# file, reported as such, rather than an unknown npz).
CROP_SIGNATURE = frozenset({"image", "nodule", "slice"})


@dataclass
class NoduleCrop:
    """All crops of one nodule: ``image`` (n, H, W) and ``readers`` (R, n, H, W) bool, in slice order."""

    patient: str
    nodule: int
    slices: list[int]
    image: ImageData
    readers: np.ndarray

    @property
    def marking_readers(self) -> list[int]:
        """Channels (0-based) that mark something anywhere in this nodule."""
        return [int(r) for r in np.flatnonzero(self.readers.reshape(len(self.readers), -1).any(axis=1))]

    def consensus(self, readers: int) -> np.ndarray:
        """Voxels marked by at least ``readers`` of the channels, (n, H, W) bool."""
        return self.readers.sum(axis=0) >= readers


def is_crop_file(keys: set[str] | frozenset[str]) -> bool:
    """Whether an npz with arrays ``keys`` is a crop file (recognised by its arrays, not its name)."""
    return CROP_SIGNATURE <= set(keys)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an npz file; an empty, unreadable or pickled file raises `ImageReadError`."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as error:
        raise ImageReadError(path, f"unreadable or corrupt npz file ({type(error).__name__}: {error})") from error


def _checked(path: Path, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    missing = [key for key in CROP_KEYS if key not in arrays]
    if missing:
        raise ImageReadError(path, f"crop file lacks {missing} (has {sorted(arrays)})")
    image, masks, nodule, number = (arrays[key] for key in CROP_KEYS)
    n = len(image)
    if image.ndim != 3 or masks.ndim != 4 or masks.shape[0] != n or masks.shape[2:] != image.shape[1:]:
        raise ImageReadError(path, f"inconsistent shapes: image {image.shape} must be (N, H, W) and masks {masks.shape} (N, readers, H, W)")
    if nodule.shape != (n,) or number.shape != (n,):
        raise ImageReadError(path, f"inconsistent shapes: nodule {nodule.shape} and slice {number.shape} must both be ({n},)")
    if n == 0:
        raise ImageReadError(path, "crop file holds no crop")
    for key, values in (("nodule", nodule), ("slice", number)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ImageReadError(path, f"'{key}' must hold integers, got {values.dtype}")
    return image, masks.astype(bool), nodule, number


def read_crop_file(path: str | Path) -> list[NoduleCrop]:
    """The nodules of one crop file, in nodule order, each stacked in ``slice`` order."""
    path = Path(path)
    image, masks, nodule, number = _checked(path, load_npz(path))
    crops = []
    for value in np.unique(nodule):
        rows = np.flatnonzero(nodule == value)
        rows = rows[np.argsort(number[rows], kind="stable")]
        slices = [int(s) for s in number[rows]]
        if len(set(slices)) != len(slices):
            raise ImageReadError(path, f"nodule {int(value)} repeats a slice number: {slices}")
        meta = {"source_files": [str(path)], "spacing_known": False, "rows": [int(r) for r in rows]}
        crops.append(
            NoduleCrop(
                patient=path.stem,
                nodule=int(value),
                slices=slices,
                image=ImageData(image[rows], axial_affine((1.0, 1.0)), "crops8bit", meta),
                readers=np.moveaxis(masks[rows], 1, 0),
            )
        )
    return crops
