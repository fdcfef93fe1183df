"""Tests of lungnlb.labels: synthetic arrays for shapes, edge cases and validation; the real LIDC npz
slices for quality against radiologist masks and the two naive baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungnlb.io import read_npz_slices
from lungnlb.labels import WatershedParams, box_to_mask, points_to_mask
from lungnlb.labels.quality import bounding_box, filled_box, inscribed_ellipse, jitter_box, mask_components
from lungnlb.overlap import dice, dice_iou

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# benchmark (benchmarks/watershed_quality.py): 0.858 mean Dice on the npz slices with 3-px padded boxes
# (baselines there: ellipse 0.619, box 0.527); the margin leaves room for library-version noise
MIN_MEAN_DICE = 0.83


def blob_image(shape=(64, 64), centre=(30, 34), radius=8, low=-850.0, high=40.0, noise=10.0, seed=0) -> np.ndarray:
    """Synthetic HU-like slice: a bright disk on dark lung with Gaussian noise."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    disk = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    rng = np.random.default_rng(seed)
    return np.where(disk, high, low) + rng.normal(0, noise, shape), disk


def test_box_to_mask_shape_dtype_and_recovers_synthetic_disk():
    image, disk = blob_image()
    mask = box_to_mask(image, bounding_box(disk, pad=3))
    assert mask.shape == image.shape and mask.dtype == bool
    assert dice(mask, disk) > 0.9


def test_box_to_mask_is_deterministic():
    image, disk = blob_image()
    box = bounding_box(disk, pad=4)
    assert np.array_equal(box_to_mask(image, box), box_to_mask(image, box))


def test_box_to_mask_same_result_on_hu_8bit_and_normalised_scales():
    image, disk = blob_image()
    box = bounding_box(disk, pad=3)
    hu = box_to_mask(image, box)
    windowed = np.clip((image + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    assert dice(box_to_mask(windowed, box), hu) > 0.95
    assert np.array_equal(box_to_mask(image / 1000.0 + 0.3, box), hu)


def test_box_to_mask_stays_inside_box_and_holds_centre():
    image, disk = blob_image(radius=12)
    box = (28, 24, 40, 36)  # smaller than the disk
    mask = box_to_mask(image, box)
    rows, cols = np.nonzero(mask)
    assert cols.min() >= 28 and cols.max() <= 40 and rows.min() >= 24 and rows.max() <= 36
    assert mask[30, 34]


def test_box_at_image_border_and_single_pixel_box():
    image, _ = blob_image(centre=(3, 3), radius=3)
    assert box_to_mask(image, (0, 0, 7, 7)).any()
    single = box_to_mask(image, (3, 3, 3, 3))
    assert single.sum() == 1 and single[3, 3]


def test_box_covering_whole_image_has_no_background_marker_but_works():
    image, disk = blob_image(shape=(32, 32), centre=(16, 16), radius=6)
    mask = box_to_mask(image, (0, 0, 31, 31))
    assert mask.shape == image.shape and mask[16, 16]


def test_object_darker_than_surroundings_uses_percentile_fallback():
    image, disk = blob_image()
    mask = box_to_mask(-image, bounding_box(disk, pad=3))  # dark disk on bright surroundings
    assert mask.any() and mask[30, 34]


def test_flat_image_falls_back_to_core_with_warning():
    with pytest.warns(UserWarning, match="no object"):
        mask = box_to_mask(np.zeros((32, 32)), (8, 8, 20, 20))
    assert mask.any() and mask[14, 14]


@pytest.mark.parametrize(
    "image, box, message",
    [
        (np.zeros((4, 32, 32)), (1, 1, 5, 5), "2D"),
        (np.zeros((32, 32)), (1, 1, 5), "x_min, y_min"),
        (np.zeros((32, 32)), (10, 1, 5, 5), "x_min > x_max"),
        (np.zeros((32, 32)), (1, 1, 5, 32), "outside"),
        (np.zeros((32, 32)), (-1, 1, 5, 5), "outside"),
        (np.zeros((32, 32)), (1.5, 1, 5, 5), "whole pixel"),
        (np.full((32, 32), np.nan), (1, 1, 5, 5), "NaN"),
    ],
)
def test_box_to_mask_rejects_bad_input(image, box, message):
    with pytest.raises(ValueError, match=message):
        box_to_mask(image, box)


def test_points_to_mask_segments_clicked_blob():
    image, disk = blob_image()
    mask = points_to_mask(image, foreground=[(34, 30)], background=[(5, 5), (60, 60), (5, 60), (60, 5)])
    assert mask.shape == image.shape and mask.dtype == bool
    assert dice(mask, disk) > 0.9


def test_points_to_mask_rejects_bad_points():
    image, _ = blob_image()
    with pytest.raises(ValueError, match="at least one foreground"):
        points_to_mask(image, foreground=[])
    with pytest.raises(ValueError, match="outside"):
        points_to_mask(image, foreground=[(64, 3)])
    with pytest.raises(ValueError, match="both foreground and background"):
        points_to_mask(image, foreground=[(3, 3)], background=[(3, 3)])


def test_quality_helpers():
    a = np.zeros((8, 8), bool)
    a[2:6, 2:6] = True
    b = np.zeros((8, 8), bool)
    b[2:6, 4:8] = True
    assert dice(a, b) == pytest.approx(0.5) and dice_iou(a, b)[1] == pytest.approx(8 / 24)
    assert bounding_box(a, pad=3) == (0, 0, 7, 7)
    assert filled_box(a.shape, (2, 2, 5, 5)).sum() == 16
    assert inscribed_ellipse(a.shape, (2, 2, 5, 5)).sum() < 16
    two = a.copy()
    two[7, 7] = True
    assert len(mask_components(two, min_pixels=2)) == 1
    rng = np.random.default_rng(0)
    for _ in range(50):
        x0, y0, x1, y1 = jitter_box((1, 1, 6, 6), (8, 8), rng, 0.5)
        assert 0 <= x0 <= x1 <= 7 and 0 <= y0 <= y1 <= 7


def test_watershed_beats_baselines_on_lidc_radiologist_masks():
    lidc = DATA / "lidc-idri"
    files = sorted(lidc.rglob("*.npz"))
    assert files, f"no LIDC npz slices under {lidc}"
    scores = {"watershed": [], "box": [], "ellipse": []}
    for path in files:
        for item in read_npz_slices(path):
            for component in mask_components(item.mask):
                box = bounding_box(component, pad=3)
                scores["watershed"].append(dice(box_to_mask(item.image.array, box), component))
                scores["box"].append(dice(filled_box(component.shape, box), component))
                scores["ellipse"].append(dice(inscribed_ellipse(component.shape, box), component))
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    assert len(scores["watershed"]) >= 50
    assert means["watershed"] >= MIN_MEAN_DICE, means
    assert means["watershed"] > means["ellipse"] + 0.1 and means["watershed"] > means["box"] + 0.1, means


def test_params_are_recorded():
    params = WatershedParams().as_dict()
    assert {"sigma", "core_fraction", "contrast_weight", "dark_fraction", "contrast_ceiling"} <= set(params)
