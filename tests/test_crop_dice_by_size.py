"""The post-processing variants of `experiments.crop_dice_by_size` (synthetic probabilities: shapes
and rules only; the evidence is the experiment's run on real validation crops)."""

from __future__ import annotations

import numpy as np

from experiments.crop_dice_by_size import by_area, by_density, hysteresis


def test_hysteresis_keeps_the_whole_extent_of_components_that_reach_the_threshold():
    probability = np.zeros((20, 20), np.float32)
    probability[2:8, 2:8] = 0.35  # a wide low rim ...
    probability[4:6, 4:6] = 0.9  # ... around a confident core: kept down to the extent
    probability[12:18, 12:18] = 0.45  # never reaches the threshold: dropped
    kept = hysteresis(probability, threshold=0.5, extent=0.3, min_pixels=4)
    assert kept[2:8, 2:8].all() and kept.sum() == 36
    assert not hysteresis(probability, threshold=0.5, extent=0.3, min_pixels=40).any()  # too small


def test_dice_by_reference_area_bins_each_slice_once():
    rows = [(10, 0.5, 20, -600.0), (15, 0.3, 30, -300.0), (60, 0.8, 60, -300.0), (700, 0.9, 690, 20.0)]
    table = by_area(rows)
    assert [row["slices"] for row in table] == [2, 1, 1]
    assert table[0]["dice"] == 0.4 and table[0]["predicted_over_reference"] == 2.0
    assert table[-1]["reference_pixels"] == ">=500"


def test_dice_by_reference_density_puts_ground_glass_apart():
    rows = [(10, 0.5, 20, -650.0), (15, 0.3, 30, -500.0), (60, 0.8, 60, -350.0), (700, 0.9, 690, -200.0)]
    table = by_density(rows)
    assert [row["reference_mean_hu"] for row in table] == ["<-500", "-500 to -200", ">=-200"]
    assert [row["slices"] for row in table] == [1, 2, 1]
    assert table[1]["dice"] == 0.55
