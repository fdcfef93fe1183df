"""The LIDC nodule volumes of interest (``lidc-nodules/vois``): one ``.npz`` per patient, named by
patient id, and a ``nodules.csv`` of ratings in the same folder.

Per nodule ``n`` the file holds ``img_R<n>`` int16 (z, y, x) HU in a tight box around the nodule,
``mask_R<n>`` uint8 (z, y, x) (published as the readers' majority vote; on the slices also in the
crops it is the union of the readers' outlines, `experiments.voi_mask_agreement`), ``spacing_R<n>``
(z, y, x) mm and ``affine_R<n>`` 4x4. The affine already follows `lungnlb.io.image`'s convention, (column, row,
slice) -> RAS mm: on LIDC-IDRI-0001, the only patient here with both a VOI and its DICOM series,
every sampled VOI voxel equals the DICOM HU at the position the two affines map it to (the LPS
reading of the same matrix differs by ~600 HU on average); tests/test_lidc_nodules.py keeps checking
it. ``nodules.csv`` rows are matched by (``patient_id``, ``nodule_id``); where the csv and the arrays
disagree on which nodules exist, the arrays decide.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungnlb.io.image import ImageData, ImageReadError
from lungnlb.io.lidc_crops import load_npz

RATINGS_FILE = "nodules.csv"
VOI_KEY = re.compile(r"(img|mask|spacing|affine)_R(\d+)")
# Relative tolerance between the affine's voxel size and ``spacing_R<n>`` (both float32 on disk).
SPACING_TOLERANCE = 1e-4


@dataclass
class NoduleVoi:
    """One nodule: the HU box with its geometry, the publisher's mask and the csv ratings (or None)."""

    patient: str
    nodule: int
    image: ImageData
    mask: np.ndarray
    ratings: dict | None


def is_voi_file(keys: set[str] | frozenset[str]) -> bool:
    """Whether an npz with arrays ``keys`` is a VOI file: some ``img_R<n>`` arrays."""
    return any(VOI_KEY.fullmatch(key) and key.startswith("img_") for key in keys)


def _value(text: str) -> int | float | str | None:
    """A csv cell as a number when it is one (finite), else the text; empty -> None."""
    text = text.strip()
    if not text:
        return None
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        return number if math.isfinite(number) else text
    return text


def read_ratings(path: str | Path) -> dict[tuple[str, int], dict[str, str]]:
    """``nodules.csv`` -> {(patient_id, nodule_id): the row as text} (`ratings_row` makes numbers of it)."""
    path = Path(path)
    try:
        with path.open(newline="") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ImageReadError(path, f"unreadable ratings csv ({type(error).__name__}: {error})") from error
    ratings = {}
    for line, row in enumerate(rows, start=2):
        patient, nodule = (row.get("patient_id") or "").strip(), _value(row.get("nodule_id") or "")
        if not patient or not isinstance(nodule, int):
            raise ImageReadError(path, f"line {line}: needs a patient_id and an integer nodule_id, got {patient!r}, {nodule!r}")
        ratings[(patient, nodule)] = row
    return ratings


def ratings_row(row: dict[str, str]) -> dict:
    """A csv row with numbers as numbers and empty cells as None."""
    return {key: _value(text or "") for key, text in row.items() if key}


def _nodule_arrays(path: Path, arrays: dict[str, np.ndarray], nodule: int) -> tuple[np.ndarray, ...]:
    names = [f"{kind}_R{nodule}" for kind in ("img", "mask", "spacing", "affine")]
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ImageReadError(path, f"nodule {nodule} lacks {missing}")
    image, mask, spacing, affine = (arrays[name] for name in names)
    if image.ndim != 3 or mask.shape != image.shape:
        raise ImageReadError(path, f"nodule {nodule}: img {image.shape} and mask {mask.shape} must be the same (z, y, x)")
    if spacing.shape != (3,) or affine.shape != (4, 4):
        raise ImageReadError(path, f"nodule {nodule}: spacing {spacing.shape} must be (3,) and affine {affine.shape} (4, 4)")
    voxel = np.linalg.norm(affine[:3, :3].astype(np.float64), axis=0)[::-1]  # (column, row, slice) -> (z, y, x)
    if not np.allclose(voxel, spacing, rtol=SPACING_TOLERANCE):
        raise ImageReadError(path, f"nodule {nodule}: the affine's voxel size {voxel.round(4).tolist()} (z, y, x) differs from spacing {spacing.tolist()}")
    return image, mask, affine


def read_voi_file(path: str | Path, ratings: dict[tuple[str, int], dict[str, str]] | None = None) -> list[NoduleVoi]:
    """The nodules of one VOI file in nodule order; ``ratings`` from `read_ratings` (None: no csv)."""
    path = Path(path)
    arrays = load_npz(path)
    numbers = sorted({int(m.group(2)) for m in map(VOI_KEY.fullmatch, arrays) if m})
    if not numbers:
        raise ImageReadError(path, f"no img_R<n> arrays: not a VOI file (has {sorted(arrays)})")
    vois = []
    for nodule in numbers:
        image, mask, affine = _nodule_arrays(path, arrays, nodule)
        meta = {"source_files": [str(path)], "spacing_known": True}
        row = (ratings or {}).get((path.stem, nodule))
        vois.append(
            NoduleVoi(
                patient=path.stem,
                nodule=nodule,
                image=ImageData(image, affine, "hu", meta),
                mask=mask > 0,
                ratings=None if row is None else ratings_row(row),
            )
        )
    return vois
