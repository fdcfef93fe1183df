"""`ImageData`: one image (a volume or a slice) with its geometry and intensity kind.

Conventions (see docs/data.md):

* ``array`` is float32 in numpy/DICOM order: ``(Z, Y, X)`` = (slice, row, column) for a volume,
  ``(Y, X)`` for a slice.
* ``affine`` is the 4x4 NIfTI-style matrix mapping voxel indices in the *reversed* order
  ``(column, row, slice, 1)`` to RAS millimetres; it is exactly the affine of the NIfTI file that
  `write_nifti` writes (whose data array is ``array`` transposed to ``(X, Y[, Z])``).
* ``spacing`` is in ``array`` axis order, millimetres.
* ``intensity`` says what the values are: ``"hu"`` (Hounsfield units), ``"windowed8bit"`` (0..255
  grey levels, already windowed by a publisher), ``"crops8bit"`` (the 8-bit LIDC nodule crops, each
  rescaled by the publisher to its own minimum and maximum; brought back to HU per crop in
  `lungnlb.io.intensity`) or ``"normalized"`` (the LIDC npz
  slices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INTENSITY_KINDS = ("hu", "windowed8bit", "crops8bit", "normalized")


class ImageReadError(ValueError):
    """An input that cannot be read as an image; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass
class ImageData:
    """An image array with its geometry (RAS affine), intensity kind and reader metadata."""

    array: np.ndarray
    affine: np.ndarray
    intensity: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise ValueError(f"ImageData needs a 2D or 3D array, got shape {self.array.shape}")
        if self.intensity not in INTENSITY_KINDS:
            raise ValueError(f"intensity must be one of {INTENSITY_KINDS}, got {self.intensity!r}")
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in millimetres, in ``array`` axis order (z, y, x) or (y, x)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)  # (column, row, slice)
        return tuple(float(s) for s in norms[: self.array.ndim][::-1])


def axial_affine(spacing_yx: tuple[float, float], slice_spacing: float = 1.0) -> np.ndarray:
    """RAS affine of an axial image without stored geometry, oriented like a standard axial CT.

    Columns run to patient left and rows to posterior (DICOM orientation [1,0,0,0,1,0] in LPS),
    which in RAS flips the first two axes: ``diag(-dx, -dy, dz, 1)``.
    """
    dy, dx = spacing_yx
    return np.diag([-float(dx), -float(dy), float(slice_spacing), 1.0])
