"""The one mapping from any source's intensity to the model's input range [0, 1].

Every kind is first brought to Hounsfield units (HU) where that is possible, then put through the
lung window, centre ``c`` = -600 HU and width ``w`` = 1500 HU by default:
``x = clip((HU - (c - w/2)) / w, 0, 1)``, i.e. -1350 HU -> 0 and +150 HU -> 1 (MONAI
`ScaleIntensityRange` with clipping).

* ``"hu"``: already HU.
* ``"windowed8bit"``: ``x = v / 255``, no HU step. IQ-OTH/NCCD's publisher gives only the windows
  used for reading (width 350..1200 HU, centre 50..600 HU), and its JPEGs are histogram-equalised:
  black below a level, the rest of the patient spread evenly over the upper half of the grey
  levels. No HU can be recovered; /255 is the only honest map.
* ``"crops8bit"`` (the 8-bit LIDC nodule crops): the publisher rescaled every crop by its own
  minimum and maximum, so the HU of a grey level differs from crop to crop (slope 6..16 HU per
  level; 1 crop in 7 has the scanner's -2048/-3024 padding as its minimum). `LungAnchoredToHU`
  with a fixed slope: the crop's parenchyma level is put at a fixed HU.
* ``"normalized"`` (the LIDC npz slices, lung-masked, ~-0.3..5): each scan was scaled by an unknown
  affine map (slopes 766..1133 HU per unit on the three patients with DICOM).
  `LungAnchoredToHU` with two landmarks: the parenchyma level and the 99th percentile of the masked
  pixels are put at fixed HU.

The constants of every kind live in an `IntensityMapping`, which a checkpoint records
(`IntensityMapping.as_config`) so that weights always get the input they were trained on. They are
measured by ``python -m experiments.intensity_fit`` (see docs/data.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.transforms import ScaleIntensityRange

LUNG_WINDOW = (-600.0, 1500.0)  # (centre, width) in HU
AIR_HU = -1000.0
# HU = slope * v + intercept: the pooled fit of npz slices against the DICOM of LIDC-IDRI-0001..0003
# that every checkpoint written before the mapping's constants were recorded was trained with.
NPZ_TO_HU_POOLED = (818.9, -887.4)


def window_bounds(window: tuple[float, float]) -> tuple[float, float]:
    """(centre, width) -> (lowest, highest) HU of the window."""
    centre, width = window
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return centre - width / 2.0, centre + width / 2.0


def parenchyma_level(values: np.ndarray, darkest: float, share: float = 0.5) -> float:
    """The grey level of lung parenchyma: the densest range among the image's darkest pixels.

    Among the ``darkest`` fraction of ``values`` (sorted, ``n`` of them), take the shortest interval
    holding ``k = share * n`` values (the "shorth", a mode estimator that needs no bin width, so it
    works alike on 8-bit levels and on floats) and return its median. Restricting to the darkest
    pixels keeps chest wall or mediastinum from winning when they fill most of the image.

    Args:
        values: 1-D array of the pixels to consider (e.g. the lung-masked pixels).
        darkest: fraction in (0, 1] of the lowest values searched.
        share: fraction of those that the interval must hold.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64).ravel())
    ordered = ordered[: max(2, int(np.ceil(darkest * ordered.size)))]
    k = max(1, int(share * ordered.size))
    if ordered.size <= k:
        return float(np.median(ordered))
    start = int(np.argmin(ordered[k:] - ordered[:-k]))
    return float(np.median(ordered[start : start + k + 1]))


@dataclass(frozen=True)
class LinearToHU:
    """``HU = slope * v + intercept`` with fixed constants."""

    slope: float
    intercept: float

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return (np.asarray(array, dtype=np.float32) * self.slope + self.intercept).astype(np.float32)

    def as_config(self) -> dict[str, Any]:
        return {"rule": "linear", "slope": self.slope, "intercept": self.intercept}


@dataclass(frozen=True)
class LungAnchoredToHU:
    """A per-image affine map to HU fixed by landmarks found in the image itself.

    With ``L`` = `parenchyma_level` of the image's pixels (those != 0 when ``masked``),

        HU = lung_hu + s * (v - L),   s = (high_hu - lung_hu) / (P_q - L)   when ``high_percentile`` q is set
                                      s = slope                              otherwise

    where ``P_q`` is the q-th percentile of the same pixels. ``lung_hu``, ``high_hu`` and ``slope``
    are pooled fits (``experiments/intensity_fit.py``), not per-file values. When the image has too
    few distinct levels for the landmarks (``P_q <= L``), the fixed ``slope`` is used.

    Args:
        lung_hu: HU given to the parenchyma level.
        slope: HU per input unit when there is no second landmark (or it is degenerate).
        darkest: fraction of the darkest pixels searched for the parenchyma (`parenchyma_level`).
        high_percentile: percentile q of the second landmark, or None for a fixed slope.
        high_hu: HU given to that percentile.
        masked: exact zeros are outside a mask (the npz slices) and are not image content.
    """

    lung_hu: float
    slope: float
    darkest: float
    high_percentile: float | None = None
    high_hu: float | None = None
    masked: bool = False

    def landmarks(self, array: np.ndarray) -> tuple[float, float]:
        """(L, s) of this image: its parenchyma level and HU per input unit."""
        values = np.asarray(array, dtype=np.float32).ravel()
        if self.masked:
            values = values[values != 0]
        if values.size == 0:
            raise ValueError("an image with no pixel inside its mask has no parenchyma level")
        level = parenchyma_level(values, self.darkest)
        if self.high_percentile is None:
            return level, self.slope
        high = float(np.percentile(values, self.high_percentile))
        if high <= level:
            return level, self.slope
        return level, (self.high_hu - self.lung_hu) / (high - level)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        level, slope = self.landmarks(array)
        return ((np.asarray(array, dtype=np.float32) - level) * slope + self.lung_hu).astype(np.float32)

    def as_config(self) -> dict[str, Any]:
        return {
            "rule": "lung_anchored",
            "lung_hu": self.lung_hu,
            "slope": self.slope,
            "darkest": self.darkest,
            "high_percentile": self.high_percentile,
            "high_hu": self.high_hu,
            "masked": self.masked,
        }


KINDS_TO_HU = ("normalized", "crops8bit")  # the kinds whose map to HU is an `IntensityMapping` field
RULES = {"linear": LinearToHU, "lung_anchored": LungAnchoredToHU}

# Measured by experiments/intensity_fit.py: crops against the same patients' VOIs (pixel pairs),
# npz slices against the DICOM of LIDC-IDRI-0001..0003.
CROPS_TO_HU = LungAnchoredToHU(lung_hu=-891.0, slope=8.53, darkest=0.3)
NORMALIZED_TO_HU = LungAnchoredToHU(
    lung_hu=-890.0, slope=NPZ_TO_HU_POOLED[0], darkest=0.5, high_percentile=99.0, high_hu=460.0, masked=True
)


def to_hu_rule(config: dict[str, Any]) -> LinearToHU | LungAnchoredToHU:
    """Rebuild a kind's map from its `as_config()` dict."""
    config = dict(config)
    rule = config.pop("rule", None)
    if rule not in RULES:
        raise ValueError(f"unknown intensity rule {rule!r}: expected one of {sorted(RULES)}")
    return RULES[rule](**config)


@dataclass(frozen=True)
class IntensityMapping:
    """The window and each kind's map to HU: everything `to_model_input` needs, recordable in a checkpoint.

    Args:
        window: (centre, width) of the lung window in HU.
        normalized: map of the ``"normalized"`` kind to HU.
        crops8bit: map of the ``"crops8bit"`` kind to HU.
    """

    window: tuple[float, float] = LUNG_WINDOW
    normalized: LinearToHU | LungAnchoredToHU = NORMALIZED_TO_HU
    crops8bit: LinearToHU | LungAnchoredToHU = CROPS_TO_HU

    def to_hu(self, array: np.ndarray, intensity: str) -> np.ndarray:
        """HU of an image of kind ``intensity`` (not defined for ``"windowed8bit"``)."""
        if intensity == "hu":
            return np.asarray(array, dtype=np.float32)
        if intensity in KINDS_TO_HU:
            return getattr(self, intensity)(array)
        raise ValueError(f"no HU for intensity {intensity!r}: expected 'hu', 'crops8bit' or 'normalized'")

    def __call__(self, array: np.ndarray, intensity: str) -> np.ndarray:
        """Map an image of kind ``intensity`` to float32 in [0, 1]."""
        if intensity == "windowed8bit":
            return np.clip(np.asarray(array, dtype=np.float32) / 255.0, 0.0, 1.0).astype(np.float32)
        if intensity != "hu" and intensity not in KINDS_TO_HU:
            raise ValueError(
                f"unknown intensity {intensity!r}: expected 'hu', 'windowed8bit', 'crops8bit' or 'normalized'"
            )
        low, high = window_bounds(self.window)
        scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(self.to_hu(array, intensity))
        return np.asarray(scaled, dtype=np.float32)

    def air(self) -> float:
        """The model input value of air (``AIR_HU``): what padding around a patient must be."""
        return self.input_of_hu(AIR_HU)

    def input_of_hu(self, hu: float) -> float:
        """The model input value of ``hu`` Hounsfield units (an image with HU, through the window)."""
        low, high = window_bounds(self.window)
        return float(np.clip((hu - low) / (high - low), 0.0, 1.0))

    def as_config(self) -> dict[str, Any]:
        """Plain (JSON) dict: the window and every kind's constants."""
        return {
            "mapping": "lungnlb.io.intensity.to_model_input",
            "window": [float(v) for v in self.window],
            "windowed8bit": {"rule": "divide", "by": 255.0},
            **{kind: getattr(self, kind).as_config() for kind in KINDS_TO_HU},
        }

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> "IntensityMapping":
        """The mapping a checkpoint's ``config["intensity"]`` records.

        Missing entries fall back to the library's constants, with one exception that keeps old
        checkpoints exact: a config without a ``"normalized"`` entry predates recorded constants,
        and every such checkpoint was trained with the pooled linear npz fit `NPZ_TO_HU_POOLED`.
        ``"window": null`` (or absent) is the lung window.
        """
        config = config or {}
        window = config.get("window")
        normalized = config.get("normalized")
        crops = config.get("crops8bit")
        return cls(
            window=tuple(float(v) for v in window) if window is not None else LUNG_WINDOW,
            normalized=to_hu_rule(normalized) if normalized else LinearToHU(*NPZ_TO_HU_POOLED),
            crops8bit=to_hu_rule(crops) if crops else CROPS_TO_HU,
        )


def to_model_input(
    array: np.ndarray,
    intensity: str,
    mapping: IntensityMapping | None = None,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Map an image of kind ``intensity`` to float32 in [0, 1] with ``mapping`` (the library's by default).

    ``window`` = (centre, width) in HU replaces the mapping's window when given.
    """
    mapping = mapping or IntensityMapping()
    if window is not None:
        mapping = IntensityMapping(window=tuple(window), normalized=mapping.normalized, crops8bit=mapping.crops8bit)
    return mapping(array, intensity)
