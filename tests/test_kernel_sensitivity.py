"""The kernel filters of `experiments.kernel_sensitivity`: in-plane only, flat regions unchanged."""

from __future__ import annotations

import numpy as np

from experiments.kernel_sensitivity import FILTERS


def test_filters_leave_flat_hu_alone_and_act_within_each_slice_only():
    flat = np.full((3, 16, 16), -800.0, np.float32)
    for name, apply in FILTERS.items():
        assert np.allclose(apply(flat), flat), name
    volume = np.full((3, 16, 16), -800.0, np.float32)
    volume[1, 6:10, 6:10] = 40.0  # a vessel's cross-section on the middle slice only
    for name, apply in FILTERS.items():
        out = apply(volume)
        assert np.allclose(out[[0, 2]], -800.0), f"{name} leaked across slices"


def test_smoothing_softens_and_sharpening_steepens_an_edge():
    volume = np.full((1, 16, 16), -800.0, np.float32)
    volume[0, :, 8:] = 40.0

    def step(out: np.ndarray) -> float:
        return float(out[0, 8, 8] - out[0, 8, 7])

    assert step(FILTERS["smooth 1.5"](volume)) < step(FILTERS["smooth 1.0"](volume)) < step(volume)
    sharpened = FILTERS["sharpen"](volume)
    assert sharpened[0, 8, 8] > 40.0 and sharpened[0, 8, 7] < -800.0  # over- and undershoot at the edge
