"""The slice probe: a linear tumour / no-tumour classifier of whole slices of one intensity kind,
on the segmentation model's frozen encoder.

The model sees 64 px windows, and on the IQ-OTH/NCCD JPEGs (mediastinal window, histogram-equalised)
its masks find fewer than half the tumours, while its encoder's features still tell the slices
apart (`experiments/results/jpeg_encoder_probe/`). For a slice ``x`` (Y, X) in model input units:

    e_k = mean over its 4 x 4 cells of the bottleneck of window k       (C values, the cls head's input)
    f   = [mean_k e_k, max_k e_k]                                       (2C values)
    p   = sigmoid(w . (f - mu) / sigma + b)

over the windows k of ``window`` px laid over the body's box at a stride of half a window. ``mu``,
``sigma``, ``w``, ``b`` and the threshold ``t`` are fitted on the training and validation patients
of one checkpoint (`lungnlb.training.slice_probe`) and stored in its config under ``slice_probe``;
they belong to that checkpoint's encoder and no other.

The slice label of a slice of the probe's intensity kind is "tumour" when its mask is non-empty or
``p >= t``: `Predictor` reports max(mask score, ``on_model_scale(p)``), where ``on_model_scale`` moves
``t`` onto the checkpoint's mask threshold. A tumour call may then come without an outline; a
non-empty mask is always a tumour call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOW_BATCH = 64


@dataclass(frozen=True)
class SliceProbe:
    """A fitted probe (formula in the module docstring): ``intensity`` the kind of slice it scores,
    ``mean`` / ``scale`` (2C,) the standardisation, ``coef`` (2C,) and ``intercept`` the regression,
    ``threshold`` its operating point on ``p``; ``fit`` how it was fitted."""

    intensity: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float
    fit: dict[str, Any] = field(default_factory=dict)

    def probability(self, features: np.ndarray) -> np.ndarray:
        """``p`` of (N, 2C) features."""
        logits = ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def on_model_scale(self, probability: np.ndarray, model_threshold: float) -> np.ndarray:
        """``p`` shifted in logit so that ``p >= threshold`` exactly when the result is >= ``model_threshold``."""
        p = np.clip(np.asarray(probability, dtype=np.float64), 1e-12, 1 - 1e-12)
        shifted = np.log(p / (1 - p)) - _logit(self.threshold) + _logit(model_threshold)
        return 1.0 / (1.0 + np.exp(-shifted))

    def as_config(self) -> dict[str, Any]:
        return {"intensity": self.intensity, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": float(self.intercept), "threshold": float(self.threshold),
                "fit": self.fit}

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> SliceProbe | None:
        if not config:
            return None
        arrays = {key: np.asarray(config[key], dtype=np.float64) for key in ("mean", "scale", "coef")}
        if len({a.shape for a in arrays.values()}) != 1 or arrays["mean"].ndim != 1:
            raise ValueError(f"slice_probe: mean, scale and coef must be vectors of one length, got "
                             f"{ {key: a.shape for key, a in arrays.items()} }")
        return cls(config["intensity"], **arrays, intercept=float(config["intercept"]),
                   threshold=float(config["threshold"]), fit=dict(config.get("fit") or {}))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def window_corners(box: tuple[slice, slice], window: int, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of ``window`` px windows over ``box`` at a stride of ``window // 2``, inside ``shape``."""
    def starts(span: slice, size: int) -> list[int]:
        last = max(min(span.stop, size) - window, 0)
        return sorted({min(s, last) for s in range(max(span.start, 0), last + window // 2, window // 2)})
    return [(y, x) for y in starts(box[0], shape[0]) for x in starts(box[1], shape[1])]


def pooled_window_features(forward: Callable[[np.ndarray], np.ndarray], plane: np.ndarray, box: tuple[slice, slice],
                           window: int) -> np.ndarray:
    """``f`` (2C,) of one (Y, X) slice in model input units: the mean and the maximum of ``forward``'s
    (B, C) features of the ``window`` px windows over ``box`` (`window_corners`), fed (B, 1, w, w)."""
    if min(plane.shape) < window:
        raise ValueError(f"a slice of {plane.shape} px is smaller than the probe's {window} px window")
    corners = window_corners(box, window, plane.shape)
    windows = np.stack([plane[y:y + window, x:x + window] for y, x in corners])[:, None]
    per_window = np.concatenate([forward(windows[i:i + WINDOW_BATCH]) for i in range(0, len(windows), WINDOW_BATCH)])
    return np.concatenate([per_window.mean(axis=0), per_window.max(axis=0)])
