"""Measure the pooled linear map npz "normalized" -> HU (`lungnlb.io.intensity.NPZ_TO_HU_POOLED`).

For every LIDC patient with both npz slices and DICOM in ../shared/data, each npz slice is matched
to the DICOM slice whose pixels inside the npz lung mask (npz != 0) correlate best (kept if
r > 0.98); HU = a * v + b is fitted by least squares per patient and pooled. Prints the fits.
The shipped weights were trained with this pooled fit; `experiments.intensity_fit` measures the
per-image rule that replaced it.

    .venv/bin/python -m experiments.npz_hu_fit
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lungnlb.io import read_dicom_series, read_npz_slices
from lungnlb.io.dicom import list_dicom_series
from lungnlb.io.intensity import NPZ_TO_HU_POOLED

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc-idri"


def matched_slices(npz: Path, folder: Path, min_r: float = 0.98) -> list[tuple[np.ndarray, np.ndarray]]:
    """(npz slice, matched DICOM slice in HU) pairs of one patient: best correlation inside the npz lung mask."""
    volume = read_dicom_series(folder)
    pairs = []
    for s in read_npz_slices(npz):
        lung = s.image.array != 0
        r = [np.corrcoef(volume.array[z][lung], s.image.array[lung])[0, 1] for z in range(len(volume.array))]
        if max(r) > min_r:
            pairs.append((s.image.array, volume.array[int(np.argmax(r))]))
    return pairs


def patients_with_dicom(data: Path = DATA) -> list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """[(patient, matched slice pairs)] for every npz file whose patient has a DICOM folder."""
    found = []
    for npz in sorted((data / "slices").glob("*.npz")):
        folder = data / "dicom" / npz.stem
        pairs = [p for series in (list_dicom_series(folder) if folder.is_dir() else []) for p in matched_slices(npz, series)]
        if pairs:
            found.append((npz.stem, pairs))
    return found


def main() -> int:
    pooled_v, pooled_hu, total = [], [], 0
    print(f"{'patient':<16}{'slices':>7}{'slope':>9}{'intercept':>11}{'resid SD':>10}")
    for patient, pairs in patients_with_dicom():
        v = np.concatenate([npz[npz != 0] for npz, _ in pairs])
        hu = np.concatenate([dicom[npz != 0] for npz, dicom in pairs])
        a, b = np.polyfit(v, hu, 1)
        print(f"{patient:<16}{len(pairs):>7}{a:>9.1f}{b:>11.1f}{np.std(hu - (a * v + b)):>10.1f}")
        pooled_v.append(v), pooled_hu.append(hu)
        total += len(pairs)
    v, hu = np.concatenate(pooled_v), np.concatenate(pooled_hu)
    a, b = np.polyfit(v, hu, 1)
    print(f"{'pooled':<16}{total:>7}{a:>9.1f}{b:>11.1f}{np.std(hu - (a * v + b)):>10.1f}")
    print(f"library constant NPZ_TO_HU_POOLED = {NPZ_TO_HU_POOLED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
