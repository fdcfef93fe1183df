"""The lung field of whole slices: where the native sliding window looks for lung tumours, and what
it keeps. Real CT for the behaviour (a slice of the Lung-PET-CT-Dx CT in the bundled sample, a
LIDC-IDRI whole slice with its radiologists' mask), synthetic shapes for the geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import DATA

from lungnlb.inference import Predictor, has_lung_grey_levels, remove_small_components, slice_lung_field
from lungnlb.io import read_image
from lungnlb.labels.lung_region import bounding_box, fill_holes, lung_field, lungs

SAMPLE_CT = "sample_data/studies/Lung_Dx-A0001_2.000000-5mm-40805.nii.gz"


def _chest(size: int = 256) -> np.ndarray:
    """Air around a body (0.6) holding two dark lungs (0.25), the right one with a nodule against its outer wall."""
    y, x = np.mgrid[:size, :size]
    plane = np.full((size, size), 0.2, np.float32)
    plane[((y - 128) / 100) ** 2 + ((x - 128) / 120) ** 2 < 1] = 0.6
    for centre in (80, 176):
        plane[((y - 128) / 60) ** 2 + ((x - centre) / 35) ** 2 < 1] = 0.25
    plane[(y - 128) ** 2 + (x - 208) ** 2 < 36] = 0.6  # a nodule biting into the right lung from the chest wall
    return plane


def test_the_field_keeps_a_nodule_against_the_chest_wall_and_leaves_out_the_mediastinum():
    field = lung_field(_chest(), closing_px=10, min_pixels=300)
    assert field[128, 203:209].all()  # the juxtapleural nodule, not in the lungs found (they stop at 202)
    assert not field[128, 128]  # the mediastinum between the lungs (50 px wide)
    assert not field[128, 20] and not field[5, 5]  # chest wall, air
    assert lung_field(np.full((256, 256), 0.6, np.float32), 10, 300) is None  # no lungs on the slice


def test_fill_holes_is_scipys_on_real_ct_and_edge_cases():
    """The body and the dark pixels of every slice of a real CT series, and shapes whose holes touch
    the border, fill exactly as `scipy.ndimage.binary_fill_holes` fills them."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    image = read_image(SAMPLE_CT)
    planes = Predictor.from_checkpoint().model_input(image.array, image.intensity)
    masks = [m for plane in planes for m in (plane > threshold_otsu(plane), plane < threshold_otsu(plane))]
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7], ring[3:6, 3:6] = True, False
    open_ring = ring.copy()
    open_ring[4, 2] = False  # the hole reaches the outside through a gap
    diagonal = np.eye(6, dtype=bool) | np.eye(6, dtype=bool)[::-1]  # 4-connected background: no holes
    masks += [ring, open_ring, ring[2:, 2:], diagonal, np.zeros((5, 5), bool), np.ones((5, 5), bool)]
    filled = [fill_holes(mask) for mask in masks]
    assert filled[-6][4, 4] and not filled[-5][4, 4]
    for mask, result in zip(masks, filled):
        assert np.array_equal(result, ndimage.binary_fill_holes(mask))


def _whole_frame_field(found: np.ndarray, closing_px: int) -> np.ndarray:
    """The closing of ``found`` by distance transforms over the whole frame, padded by ``closing_px``."""
    from scipy import ndimage

    padded = np.pad(found, closing_px)
    dilated = ndimage.distance_transform_edt(~padded) <= closing_px
    closed = ndimage.distance_transform_edt(dilated) > closing_px
    return closed[closing_px:-closing_px, closing_px:-closing_px] | found


@pytest.mark.parametrize("margin", [2, 5, 40])
def test_the_field_on_the_lungs_box_equals_the_whole_frame_closing(margin):
    """Real CT, cut to ``margin`` pixels around its lungs: within 10 px the closing reaches past
    every edge of the image."""
    image = read_image(SAMPLE_CT)
    plane = Predictor.from_checkpoint().model_input(image.array[2], image.intensity)
    rows, columns = bounding_box(lungs(plane))
    plane = plane[rows.start - margin:rows.stop + margin, columns.start - margin:columns.stop + margin]
    found = lungs(plane)
    field = lung_field(plane, closing_px=10, min_pixels=300)
    assert found is not None and field is not None and field.sum() > found.sum()
    assert found[margin].any() and found[:, margin].any()  # the lungs are where they were, near the edges
    assert np.array_equal(field, _whole_frame_field(found, 10))


def test_components_that_miss_the_field_are_removed():
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 2:6, 2:6] = True  # touches the field at one pixel: kept whole
    mask[0, 12:16, 12:16] = True  # outside: removed
    field = np.zeros((1, 20, 20), bool)
    field[0, 5, 5] = True
    kept = remove_small_components(mask, 4, field)
    assert kept[0, 2:6, 2:6].all() and not kept[0, 12:, 12:].any()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_checkpoint()


def _off_field(probability: np.ndarray, field: np.ndarray, threshold: float) -> np.ndarray:
    """The pixels of the predicted components (at ``threshold``) with no pixel in ``field``."""
    from scipy import ndimage

    labels, _ = ndimage.label(probability > threshold, np.ones((3, 3), bool))
    return (labels > 0) & ~np.isin(labels, labels[field])


def _every_window(predictor: Predictor) -> Predictor:
    return Predictor(predictor.model, {**predictor.config, "lung_filter": False})


def test_skipped_windows_leave_the_lungs_unchanged(predictor):
    image = read_image(SAMPLE_CT)
    plane = predictor.model_input(image.array[2], image.intensity)
    field = predictor.lung_field(plane)
    assert field is not None and 0.05 < field.mean() < 0.6
    kept, _ = predictor.predict_normalized(plane[None])
    full, _ = _every_window(predictor).predict_normalized(plane[None])
    assert np.allclose(kept[0][field], full[0][field], atol=1e-5)
    assert not kept[0][_off_field(full[0], field, predictor.threshold)].any()


def test_a_volume_skips_the_slices_without_lungs(predictor, monkeypatch):
    image = read_image(SAMPLE_CT)
    chest = predictor.model_input(image.array[2], image.intensity)
    abdomen = np.where(predictor.lung_field(chest), 0.6, chest).astype(np.float32)  # its lungs filled with tissue
    volume = np.stack([abdomen, chest])
    assert predictor.lung_field(volume[0]) is None and predictor.lung_field(volume[1]) is not None
    windows = []
    monkeypatch.setattr(predictor, "model", lambda x: windows.append(len(x)) or {"seg": torch.zeros(len(x), 1, *x.shape[2:])})

    def windows_run(part: np.ndarray) -> int:
        windows.clear()
        predictor.predict_normalized(part)
        return sum(windows)

    assert windows_run(volume[:1]) > 0  # alone, a slice without lungs is still read (a crop, an odd image)
    assert windows_run(volume) == windows_run(volume[1:])  # beside a slice with lungs, it is skipped


def test_whole_slice_false_positives_outside_the_lungs_are_removed(predictor):
    """LIDC-IDRI-0002 (never trained on): without the field, the model marks the mediastinum and the chest wall."""
    series = next((DATA / "lidc-idri" / "dicom" / "LIDC-IDRI-0002").glob("*/*"))
    image = read_image(series)
    plane = image.array[len(image.array) // 2]
    field = predictor.lung_field(predictor.model_input(plane, image.intensity))
    raw = _every_window(predictor).predict(plane, image.intensity).probability
    kept = predictor.predict(plane, image.intensity).probability
    off = _off_field(raw, field, predictor.threshold)
    assert off.any() and not (kept[off] > predictor.threshold).any()


def test_lungs_are_sought_only_on_slices_with_the_grey_levels_of_air_and_lung():
    """Every slice of a real CT has them; the IQ-OTH/NCCD JPEGs (mediastinal window, equalised) have
    none, though Otsu's threshold finds "lungs" in some of them: the mediastinum or the spine."""
    predictor = Predictor.from_checkpoint()
    image = read_image(SAMPLE_CT)
    planes = predictor.model_input(image.array, image.intensity)
    assert all(has_lung_grey_levels(plane, predictor.config) for plane in planes)
    assert any(slice_lung_field(plane, predictor.config) is not None for plane in planes)
    found_by_otsu = 0
    for path in sorted((DATA / "iq-othnccd").glob("*/*.jpg"))[::10]:
        jpeg = read_image(path)
        plane = predictor.model_input(jpeg.array, jpeg.intensity)
        assert not has_lung_grey_levels(plane, predictor.config), path.name
        assert slice_lung_field(plane, predictor.config) is None
        found_by_otsu += lung_field(plane, 10, 300) is not None
    assert found_by_otsu > 0
