"""Feeding a nodule crop to a model trained on whole slices.

A crop (sidecar ``"crop": true``: the 72 x 72 LIDC nodule crops, the tight HU boxes of the VOIs) is a
small window of a slice at the scanner's own pixel size. A model sees pixels at the scale it was
trained at, so the default rule ``"pad"`` restores that scale: each crop slice (already mapped to the
model's [0, 1] input) is placed at the centre of a square canvas filled with air (-1000 HU through
the model's own intensity mapping), predicted like any slice, and cut back out. The canvas is the
whole slice a whole-slice model was trained on (``config["slice_size"]``, ``WHOLE_SLICE`` pixels
when the checkpoint does not say); a native-resolution model (``patch_size``) already works at the
crop's scale, so its canvas (its config's ``slice_size`` is the patch size) is just large enough for one window. The alternative ``"resize"`` hands the crop to the model as if it were a whole slice (the
`Predictor` resizes it to the input size), which enlarges a nodule several-fold beyond anything the
model saw in training; it is offered for comparison.

    crop (n, h, w) in [0, 1] -> canvas (n, S, S), S = max(slice_size, h, w) -> probability (n, h, w)
"""

from __future__ import annotations

import numpy as np

CROP_RULES = ("pad", "resize")
WHOLE_SLICE = 512  # pixels across the CT slices the shipped models were trained on


def predict_crops(predictor, volume: np.ndarray, rule: str = "pad") -> tuple[np.ndarray | None, np.ndarray]:
    """(mask probability (n, h, w) or None, slice probability (n,)) for crop slices ``volume`` in [0, 1]."""
    if rule not in CROP_RULES:
        raise ValueError(f"unknown crop rule {rule!r}: expected one of {CROP_RULES}")
    if rule == "resize":
        return predictor.predict_normalized(volume)
    canvas, cut = crop_canvas(predictor, volume)
    probability, slice_probability = predictor.predict_normalized(canvas)
    return (None if probability is None else probability[cut]), slice_probability


def crop_canvas(predictor, volume: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """The rule ``"pad"``: crop slices (n, h, w) in [0, 1] at the centre of an air canvas
    (n, S, S), and the index that cuts them back out of it."""
    n, height, width = volume.shape
    size = max(int(predictor.config.get("slice_size", WHOLE_SLICE)), height, width)
    top, left = (size - height) // 2, (size - width) // 2
    canvas = np.full((n, size, size), predictor.air(), np.float32)
    cut = (slice(None), slice(top, top + height), slice(left, left + width))
    canvas[cut] = volume
    return canvas, cut
