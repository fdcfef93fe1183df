"""The per-patient report: hand-computed cases (tumour-free slices, empty predictions, readers), the
patient bootstrap, duplicate slices by content, crops fed to a whole-slice model."""

from __future__ import annotations

import numpy as np
import pytest

from lungnlb.evaluation.crops import predict_crops
from lungnlb.evaluation.duplicates import SliceKey, find_duplicates
from lungnlb.evaluation.metrics import lesion_detection, patient_bootstrap_ci
from lungnlb.evaluation.predict import LoadedImage, SliceResult, _predict_image
from lungnlb.evaluation.report import build_report
from lungnlb.evaluation.scoring import human_agreement, score_slices
from train_helpers import DATA


def _slice(case, reference, probability, label=None, score=0.0, crop=False, readers=None, source="s"):
    shape = (8, 8) if probability is None else probability.shape
    return SliceResult(f"{case}_img", case, source, 0, crop, label, score, np.zeros(shape, np.float16),
                       reference, probability, readers or {})


def _box(y0, y1, x0, x1, value=1.0, shape=(8, 8)):
    array = np.zeros(shape, np.float32)
    array[y0:y1, x0:x1] = value
    return array


def test_report_by_hand():
    tumour = _box(2, 4, 2, 4) > 0
    results = [
        # patient a: found exactly (Dice 1), called tumour
        _slice("a", tumour, _box(2, 4, 2, 4, 0.9), label=1, score=0.9),
        # patient b: an empty prediction on a tumour slice (Dice 0), missed by the classifier
        _slice("b", tumour, np.zeros((8, 8), np.float32), label=1, score=0.2),
        # patient c: a tumour-free whole slice with two spurious blobs, called tumour
        _slice("c", np.zeros((8, 8), bool), _box(0, 1, 0, 1, 0.8) + _box(6, 7, 6, 7, 0.7), label=0, score=0.7),
        # patient d: a class-only tumour-free slice (no mask), called clean
        _slice("d", None, np.zeros((8, 8), np.float32), label=0, score=0.1),
    ]
    report = build_report(score_slices(results, 0.5), 0.5, n_bootstrap=0)
    assert report["dice"] == pytest.approx(0.5) and report["iou"] == pytest.approx(0.5)
    # tp = a, fn = b, fp = c, tn = d
    assert report["precision"] == pytest.approx(0.5) and report["recall"] == pytest.approx(0.5)
    assert report["f1"] == pytest.approx(0.5) and report["specificity"] == pytest.approx(0.5)
    assert report["n_patients"] == 4 and report["n_slices"] == 4
    free = report["tumour_free"]
    assert free["n_tumour_free_slices"] == 2 and free["false_positive_rate"] == pytest.approx(0.5)
    assert free["false_positive_components_per_slice"] == pytest.approx(1.0)  # (2 + 0) / 2 slices
    assert free["n_lesions"] == 2 and free["lesion_sensitivity"] == pytest.approx(0.5)
    assert report["patients_without_reference"] == {"count": 2, "patients": ["c", "d"]}
    assert report["readers"] is None
    rows = {row["patient"]: row for row in report["by_patient"]}
    assert rows["b"]["dice"] == 0.0 and rows["c"]["tumour_free_called_tumour"] == 1


def test_tumour_free_calls_by_series_count_each_ct_series_and_leave_single_slices_out():
    free, empty = np.zeros((8, 8), bool), np.zeros((8, 8), np.float32)
    results = [_slice("p", free, empty, label=0, score=score) for score in (0.9, 0.1, 0.8)]
    results += [_slice("p", free, empty, label=0, score=0.9), _slice("q", free, empty, label=0, score=0.9)]
    for result, image in zip(results, ("lung", "lung", "body", "body", "jpeg")):
        result.image_id = image
    series = build_report(score_slices(results, 0.5), 0.5, n_bootstrap=0)["tumour_free"]["by_series"]
    assert series == [{"image_id": "body", "patient": "p", "n_tumour_free_slices": 2, "called_tumour": 2},
                      {"image_id": "lung", "patient": "p", "n_tumour_free_slices": 2, "called_tumour": 1}]


def test_specificity_is_null_without_tumour_free_slices_and_crops_never_count_as_tumour_free():
    tumour = _box(2, 4, 2, 4) > 0
    results = [_slice("a", tumour, _box(2, 4, 2, 4, 0.9), label=1, score=0.9),
               _slice("b", np.zeros((8, 8), bool), np.zeros((8, 8), np.float32), crop=True)]
    report = build_report(score_slices(results, 0.5), 0.5, n_bootstrap=0)
    assert report["specificity"] is None and report["n_tumour_free_slices"] == 0
    assert report["tumour_free"]["n_tumour_free_slices"] == 0


def test_readers_and_human_reference_by_hand():
    r1, r2, r3 = _box(2, 6, 2, 6) > 0, _box(2, 6, 2, 4) > 0, _box(2, 6, 2, 6) > 0
    # r1 vs (r2+r3 >= 2) = r2: 2*8/(16+8); r2 vs r1&r3 = r1: 2*8/(8+16); r3 vs r1&r2 = r2: same
    assert human_agreement({"reader1": r1, "reader2": r2, "reader3": r3}) == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert human_agreement({"reader1": r1, "reader2": r2}) == []  # fewer than 2 others: no reference
    consensus = r1
    result = _slice("a", consensus, _box(2, 6, 2, 6, 0.9), label=1, score=0.9, crop=True,
                    readers={"reader1": r1, "reader2": r2, "reader3": r3})
    readers = build_report(score_slices([result], 0.5), 0.5, n_bootstrap=0)["readers"]
    assert readers["model_vs_consensus"]["dice"] == pytest.approx(1.0)
    assert readers["model_vs_each_reader"]["mean_over_slices"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert readers["human_reference"]["n_pairs"] == 3


def test_lesion_detection_components():
    reference = (_box(0, 2, 0, 2) + _box(5, 7, 5, 7)) > 0
    probability = _box(1, 3, 1, 3, 0.9) + _box(0, 1, 6, 8, 0.6)
    found = lesion_detection(probability, reference, 0.5)
    assert (found["lesions"], found["found"], found["false_positives"]) == (2, 1, 1)
    assert found["lesion_scores"] == pytest.approx([0.9, 0.0]) and found["false_positive_scores"] == pytest.approx([0.6])


def test_patient_bootstrap_resamples_patients_not_slices():
    # one patient with one perfect slice, one with nine failed slices: resampling patients draws
    # {a, a} (mean 1) and {b, b} (mean 0) often enough to span [0, 1]; slice resampling never would
    values = np.array([1.0] + [0.0] * 9)
    patients = np.array(["a"] + ["b"] * 9)
    low, high = patient_bootstrap_ci(lambda idx: float(values[idx].mean()), patients, 400)
    assert low == 0.0 and high == 1.0


def test_duplicates_by_content_on_real_lidc_slices():
    from lungnlb.io import read_dicom_series, read_npz_slices
    from lungnlb.io.dicom import list_dicom_series

    lidc = DATA / "lidc-idri"
    patient = sorted(p.name for p in (lidc / "dicom").iterdir())[0]
    volume = read_dicom_series(list_dicom_series(lidc / "dicom" / patient)[0])
    npz = read_npz_slices(lidc / "slices" / f"{patient}.npz")
    keys = [SliceKey("dicom", z, patient, "hu", volume.array[z]) for z in range(len(volume.array))]
    keys += [SliceKey(f"npz{i}", 0, patient, "normalized", s.image.array) for i, s in enumerate(npz)]
    pairs = find_duplicates(keys)
    # every npz slice of this patient is one of its DICOM slices; no two DICOM slices are paired
    assert len(pairs) == len(npz)
    assert all(kept.image_id == "dicom" and gone.image_id.startswith("npz") for kept, gone, _ in pairs)
    assert len({kept.z for kept, _, _ in pairs}) == len(npz)


def test_duplicates_within_one_pipeline_are_found():
    rng = np.random.default_rng(0)
    slice_ = rng.normal(0, 1, (32, 32)).astype(np.float32)
    other = rng.normal(0, 1, (32, 32)).astype(np.float32)
    keys = [SliceKey("x", 0, "p", "normalized", slice_), SliceKey("y", 0, "p", "normalized", slice_.copy()),
            SliceKey("z", 0, "p", "normalized", other)]
    pairs = find_duplicates(keys)
    assert [(k.image_id, g.image_id) for k, g, _ in pairs] == [("x", "y")]


class _RecordingPredictor:
    """Records what the model is handed; predicts a disc where the input is brighter than air."""

    threshold = 0.5

    def __init__(self, slice_size):
        self.config = {"slice_size": slice_size}
        self.seen = []

    def air(self):
        return (-1000 + 1350) / 1500

    def model_input(self, array, intensity):
        return array

    def predict_normalized(self, volume, intensity=None):
        self.seen.append(volume.shape)
        return (volume > 0.5).astype(np.float32), volume.reshape(len(volume), -1).max(1)


def test_crop_is_padded_with_air_to_the_whole_slice_and_cut_back():
    predictor = _RecordingPredictor(slice_size=40)
    crop = np.full((2, 10, 12), 0.2, np.float32)
    crop[:, 4:6, 5:7] = 0.9
    probability, scores = predict_crops(predictor, crop, "pad")
    assert predictor.seen == [(2, 40, 40)]
    assert probability.shape == (2, 10, 12) and probability[:, 4:6, 5:7].all() and probability.sum() == 8
    assert predict_crops(predictor, crop, "resize")[0].shape == (2, 10, 12) and predictor.seen[-1] == (2, 10, 12)
    with pytest.raises(ValueError, match="crop rule"):
        predict_crops(predictor, crop, "stretch")


def test_a_volume_is_predicted_with_the_slices_between_its_labelled_ones():
    raw = np.zeros((6, 8, 8), np.float32)
    for z in range(6):
        raw[z, :z + 1, 0] = 0.9  # slice z marks z + 1 pixels
    reference = raw > 0.5
    record = {"image_id": "v", "case": "p", "source": "s", "intensity": "normalized"}
    loaded = LoadedImage(record, raw, reference, {}, [(1, True, 1), (4, True, 1)])
    predictor = _RecordingPredictor(slice_size=8)
    results = list(_predict_image(loaded, predictor, "pad"))
    assert predictor.seen == [(4, 8, 8)]  # slices 1 to 4, so that 2 and 3 join them
    assert [r.z for r in results] == [1, 4]
    assert [int(r.probability.sum()) for r in results] == [2, 5]


def test_patients_a_checkpoint_saw_are_left_out():
    from lungnlb.evaluation.evaluate import seen_cases

    config = {"training_data": {"train_cases": ["p1", "p2"], "held_out_cases": {"val": ["p3"], "test": ["p4"]}}}
    assert seen_cases(config) == {"p1", "p2", "p3"}
    assert seen_cases(config, "trained") == {"p1", "p2"}
    assert seen_cases(config, "none") == set() and seen_cases({}) == set()
    with pytest.raises(ValueError, match="exclusion"):
        seen_cases(config, "some")
