"""DICOM CT reader: a series folder or a single file -> `ImageData` in Hounsfield units.

Slices are ordered by their ImagePositionPatient projected on the slice normal
``n = row_direction x column_direction`` (from ImageOrientationPatient), never by file name.
Stored values are mapped to HU with ``HU = stored * RescaleSlope + RescaleIntercept``.

Geometry: with row direction ``r`` (along a row, i.e. increasing column), column direction ``c``,
pixel spacing ``(dy, dx)``, first-slice position ``p0`` and slice step vector ``s`` (difference of
consecutive positions), the LPS affine maps (column, row, slice) to
``p0 + i*dx*r + j*dy*c + k*s``; the stored affine is RAS = diag(-1, -1, 1, 1) @ LPS.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from lungnlb.io.image import ImageData, ImageReadError

LOGGER = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NON_DICOM_SUFFIXES = {".xml", ".txt", ".json", ".md", ".csv", ".jpg", ".jpeg", ".png"}


def read_header(path: str | Path, stop_before_pixels: bool = True) -> pydicom.Dataset:
    """Read a DICOM file, raising `ImageReadError` for empty, truncated or non-DICOM files."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as error:
        raise ImageReadError(path, f"not a DICOM file ({error})") from error
    except Exception as error:  # pydicom raises assorted errors on truncated/corrupt files
        raise ImageReadError(path, f"unreadable or corrupt DICOM file ({type(error).__name__}: {error})") from error


def _check_ct_slice(path: Path, ds: pydicom.Dataset) -> None:
    modality = ds.get("Modality")
    if modality != "CT":
        raise ImageReadError(path, f"modality is {modality!r}, not CT")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            raise ImageReadError(path, f"missing {keyword}, cannot place the slice in space")


def slice_hu(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Pixel data of one CT slice in HU (float32, rows x columns)."""
    if "PixelData" not in ds:
        raise ImageReadError(path, "missing pixel data")
    try:
        stored = ds.pixel_array
    except Exception as error:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageReadError(
            path, f"pixel data cannot be decoded (transfer syntax {syntax}; {type(error).__name__}: {error})"
        ) from error
    if stored.ndim != 2:
        raise ImageReadError(path, f"expected a single-frame slice, pixel data has shape {stored.shape}")
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    return (stored.astype(np.float32) * slope + intercept).astype(np.float32)


def _orientation(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _affine(ds: pydicom.Dataset, slice_step: np.ndarray) -> np.ndarray:
    row_dir, col_dir, _ = _orientation(ds)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dx
    lps[:3, 1] = col_dir * dy
    lps[:3, 2] = slice_step
    lps[:3, 3] = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    return LPS_TO_RAS @ lps


def _slice_meta(ds: pydicom.Dataset) -> dict:
    return {
        "modality": "CT",
        "patient_id": str(ds.get("PatientID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "convolution_kernel": str(ds.get("ConvolutionKernel", "")),
    }


def read_dicom_file(path: str | Path) -> ImageData:
    """One DICOM CT slice -> 2D `ImageData` (HU); its slice thickness is the affine's third column."""
    path = Path(path)
    ds = read_header(path, stop_before_pixels=False)
    _check_ct_slice(path, ds)
    hu = slice_hu(path, ds)
    _, _, normal = _orientation(ds)
    thickness = float(ds.get("SliceThickness", 1.0) or 1.0)
    meta = _slice_meta(ds) | {
        "sop_instance_uids": [str(ds.SOPInstanceUID)],
        "slice_positions": [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))],
        "source_files": [str(path)],
        "skipped_files": 0,
    }
    return ImageData(hu, _affine(ds, normal * thickness), "hu", meta)


def _readable_slices(files: list[Path]) -> tuple[list[tuple[Path, pydicom.Dataset]], list[str]]:
    slices, skipped = [], []
    for path in files:
        try:
            ds = read_header(path, stop_before_pixels=False)
            _check_ct_slice(path, ds)
            if "PixelData" not in ds:
                raise ImageReadError(path, "missing pixel data")
        except ImageReadError as error:
            LOGGER.warning("skipping %s", error)
            skipped.append(str(error))
            continue
        slices.append((path, ds))
    return slices, skipped


def dicom_files(folder: Path) -> list[Path]:
    """Candidate DICOM files of a folder (not recursive): every regular file not obviously something else."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NON_DICOM_SUFFIXES
    )


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> ImageData:
    """A folder holding one CT series -> 3D `ImageData` (Z, Y, X) in HU, slices sorted along the normal.

    Unreadable, non-CT or pixel-less files are skipped with a logged warning; their number is
    ``meta["skipped_files"]`` and the reasons ``meta["skipped_reasons"]``. A folder mixing several
    series raises `ImageReadError` unless ``series_uid`` picks one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such DICOM folder")
    slices, skipped = _readable_slices(dicom_files(folder))
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if series_uid is not None:
        slices = [(p, ds) for p, ds in slices if str(ds.get("SeriesInstanceUID", "")) == series_uid]
    elif len(series) > 1:
        raise ImageReadError(folder, f"mixed series in one folder ({len(series)} SeriesInstanceUIDs: {', '.join(series)}); pass series_uid")
    if not slices:
        raise ImageReadError(folder, f"no readable CT slice ({len(skipped)} files skipped: {'; '.join(skipped[:3])})")
    if skipped:
        LOGGER.warning("%s: skipped %d unreadable file(s)", folder, len(skipped))
    return _stack(folder, slices, skipped)


def _stack(folder: Path, slices: list[tuple[Path, pydicom.Dataset]], skipped: list[str]) -> ImageData:
    _, _, normal = _orientation(slices[0][1])
    positions = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for _, ds in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(shapes) > 1:
        raise ImageReadError(folder, f"slices of different sizes in one series: {sorted(shapes)}")
    if len(slices) > 1:
        first = np.asarray(slices[0][1].ImagePositionPatient, dtype=float)
        last = np.asarray(slices[-1][1].ImagePositionPatient, dtype=float)
        step = (last - first) / (len(slices) - 1)
        gaps = np.diff(positions)
        if np.any(gaps < 1e-3):
            raise ImageReadError(folder, "two slices share one position (duplicate slices in the series)")
        if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
            LOGGER.warning("%s: uneven slice spacing (%.3f..%.3f mm); affine uses the mean", folder, gaps.min(), gaps.max())
    else:
        step = normal * float(slices[0][1].get("SliceThickness", 1.0) or 1.0)
    volume = np.stack([slice_hu(path, ds) for path, ds in slices])
    meta = _slice_meta(slices[0][1]) | {
        "sop_instance_uids": [str(ds.SOPInstanceUID) for _, ds in slices],
        "slice_positions": [float(p) for p in positions],
        "source_files": [str(path) for path, _ in slices],
        "skipped_files": len(skipped),
        "skipped_reasons": skipped,
    }
    return ImageData(volume, _affine(slices[0][1], step), "hu", meta)


def walk_files(root: str | Path) -> list[Path]:
    """Every regular file below ``root``, following folder symlinks (each real folder visited once), sorted."""
    found, visited = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders.sort()
        found += [Path(folder) / name for name in files if not name.startswith(".")]
    return sorted(found)


def list_dicom_series(root: str | Path) -> list[Path]:
    """Folders under ``root`` (recursive, ``root`` included, symlinks followed) that directly hold ``.dcm`` files."""
    return sorted({p.parent for p in walk_files(root) if p.suffix.lower() == ".dcm"})
