"""Measure the linear map npz "normalized" -> HU used by `lungnlb.io.intensity` (NPZ_TO_HU).

For every LIDC patient with both npz slices and DICOM in ../shared/data, each npz slice is matched
to the DICOM slice whose pixels inside the npz lung mask (npz != 0) correlate best (kept if
r > 0.98); HU = a * v + b is fitted by least squares per patient and pooled. Prints the fits.

    .venv/bin/python benchmarks/npz_hu_fit.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lungnlb.io import read_dicom_series, read_npz_slices  # noqa: E402
from lungnlb.io.dicom import list_dicom_series  # noqa: E402
from lungnlb.io.intensity import NPZ_TO_HU  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "lidc-idri"


def matched_pixels(npz: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    volume = read_dicom_series(folder)
    values, hu, slices = [], [], 0
    for s in read_npz_slices(npz):
        lung = s.image.array != 0
        r = [np.corrcoef(volume.array[z][lung], s.image.array[lung])[0, 1] for z in range(len(volume.array))]
        if max(r) > 0.98:
            values.append(s.image.array[lung])
            hu.append(volume.array[int(np.argmax(r))][lung])
            slices += 1
    return np.concatenate(values) if values else np.empty(0), np.concatenate(hu) if hu else np.empty(0), slices


def main() -> int:
    pooled_v, pooled_hu, total = [], [], 0
    print(f"{'patient':<16}{'slices':>7}{'slope':>9}{'intercept':>11}{'resid SD':>10}")
    for npz in sorted((DATA / "slices").glob("*.npz")):
        folders = list_dicom_series(DATA / "dicom" / npz.stem) if (DATA / "dicom" / npz.stem).is_dir() else []
        for folder in folders:
            v, hu, n = matched_pixels(npz, folder)
            if n == 0:
                continue
            a, b = np.polyfit(v, hu, 1)
            print(f"{npz.stem:<16}{n:>7}{a:>9.1f}{b:>11.1f}{np.std(hu - (a * v + b)):>10.1f}")
            pooled_v.append(v), pooled_hu.append(hu)
            total += n
    v, hu = np.concatenate(pooled_v), np.concatenate(pooled_hu)
    a, b = np.polyfit(v, hu, 1)
    print(f"{'pooled':<16}{total:>7}{a:>9.1f}{b:>11.1f}{np.std(hu - (a * v + b)):>10.1f}")
    print(f"library constant NPZ_TO_HU = {NPZ_TO_HU}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
