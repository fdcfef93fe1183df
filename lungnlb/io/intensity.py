"""The one mapping from any source's intensity to the model's input range [0, 1].

* ``"hu"``: lung window, centre ``c`` = -600 HU and width ``w`` = 1500 HU by default:
  ``x = clip((HU - (c - w/2)) / w, 0, 1)``, i.e. -1350 HU -> 0 and +150 HU -> 1
  (MONAI `ScaleIntensityRange` with clipping).
* ``"windowed8bit"``: ``x = v / 255``. IQ-OTH/NCCD was windowed by its publisher with an unknown
  window (its description only gives width 350..1200 HU, centre 50..600 HU used for reading),
  so no HU can be recovered; /255 is the only honest map.
* ``"crops8bit"`` (the 8-bit LIDC nodule crops): ``HU = 7.9 * v - 1010`` (first fit on pixel pairs
  with the same patients' VOIs), then the lung window as for HU.
* ``"normalized"`` (the LIDC npz slices, lung-masked, ~-0.3..5): first to HU with the linear map
  ``HU = 818.9 * v - 887.4`` fitted on all 22 npz slices that match a DICOM slice of the same
  patient (pixels inside the lung mask; per-patient slopes 766..1133, pooled residual SD 78 HU;
  ``benchmarks/npz_hu_fit.py``), then the lung window as for HU.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRange

LUNG_WINDOW = (-600.0, 1500.0)  # (centre, width) in HU
NPZ_TO_HU = (818.9, -887.4)  # HU = slope * v + intercept, measured by benchmarks/npz_hu_fit.py
CROPS_TO_HU = (7.9, -1010.0)  # HU = slope * v + intercept for the 8-bit LIDC nodule crops (pixel pairs with the VOIs)


def window_bounds(window: tuple[float, float]) -> tuple[float, float]:
    """(centre, width) -> (lowest, highest) HU of the window."""
    centre, width = window
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return centre - width / 2.0, centre + width / 2.0


def normalized_to_hu(array: np.ndarray) -> np.ndarray:
    """Approximate HU of an npz "normalized" image (measured linear fit, see module docstring)."""
    slope, intercept = NPZ_TO_HU
    return np.asarray(array, dtype=np.float32) * slope + intercept


def to_model_input(array: np.ndarray, intensity: str, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map an image of kind ``intensity`` to float32 in [0, 1]; ``window`` = (centre, width) in HU."""
    array = np.asarray(array, dtype=np.float32)
    if intensity == "windowed8bit":
        return np.clip(array / 255.0, 0.0, 1.0).astype(np.float32)
    if intensity == "normalized":
        array = normalized_to_hu(array)
    elif intensity == "crops8bit":
        array = array * CROPS_TO_HU[0] + CROPS_TO_HU[1]
    elif intensity != "hu":
        raise ValueError(f"unknown intensity {intensity!r}: expected 'hu', 'windowed8bit', 'crops8bit' or 'normalized'")
    low, high = window_bounds(window or LUNG_WINDOW)
    scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(array)
    return np.asarray(scaled, dtype=np.float32)
