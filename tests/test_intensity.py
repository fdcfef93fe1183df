"""The intensity mapping on the real files: crops and npz against HU, and its record in checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import pytest

from experiments.intensity_fit import clipped_error, matched_crops
from experiments.npz_hu_fit import patients_with_dicom
from lungnlb.inference import Predictor
from lungnlb.io.intensity import (
    CROPS_TO_HU,
    NPZ_TO_HU_POOLED,
    IntensityMapping,
    LinearToHU,
    LungAnchoredToHU,
    to_model_input,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# experiments/results/intensity_fit.json: per-patient mean |error| of the crops rule against the VOIs,
# median 57 HU and 90th percentile 169 HU over 404 patients (the fixed line: 130 and 306).
CROPS_MEDIAN_ERROR_HU = 80.0
CROPS_PATIENTS = 40


@pytest.fixture(scope="module")
def crops() -> list[dict]:
    assert (DATA / "lidc-nodules").is_dir(), "real data folder is missing (see ../shared/data/README.md)"
    return matched_crops(DATA / "lidc-nodules", limit=CROPS_PATIENTS)


def _per_patient_median(rule, crops: list[dict]) -> float:
    errors: dict[str, list[float]] = {}
    for c in crops:
        errors.setdefault(c["patient"], []).append(clipped_error(rule(c["image"]), c["a"] * c["image"] + c["b"]).mean())
    return float(np.median([np.mean(e) for e in errors.values()]))


def test_crops_are_rescaled_per_crop(crops):
    """Each crop is an exact affine image of its VOI slice (residual = 8-bit rounding), with its own slope."""
    assert len(crops) >= CROPS_PATIENTS
    assert np.median([c["residual_sd"] for c in crops]) < 5.0
    slopes = np.array([c["a"] for c in crops])
    assert np.percentile(slopes, 90) / np.percentile(slopes, 10) > 1.3, "one fixed line would fit them all"


def test_crops_rule_error_against_vois(crops):
    anchored = _per_patient_median(CROPS_TO_HU, crops)
    fixed = _per_patient_median(LinearToHU(5.07, -910.9), crops)
    assert anchored < CROPS_MEDIAN_ERROR_HU, anchored
    assert anchored < fixed, (anchored, fixed)


def test_npz_rule_beats_pooled_fit_per_patient():
    patients = patients_with_dicom(DATA / "lidc-idri")
    assert len(patients) >= 3
    for patient, pairs in patients:
        errors = {}
        for name, rule in (("pooled", LinearToHU(*NPZ_TO_HU_POOLED)), ("library", IntensityMapping().normalized)):
            errors[name] = np.mean([clipped_error(rule(npz)[npz != 0], dicom[npz != 0]).mean() for npz, dicom in pairs])
        assert errors["library"] <= errors["pooled"], (patient, errors)
        assert errors["library"] < 30.0, (patient, errors)


def test_mapping_round_trips_through_a_checkpoint_config():
    mapping = IntensityMapping(window=(40.0, 400.0), crops8bit=LungAnchoredToHU(lung_hu=-850.0, slope=9.0, darkest=0.3))
    config = json.loads(json.dumps(mapping.as_config()))
    assert IntensityMapping.from_config(config) == mapping
    assert IntensityMapping.from_config(IntensityMapping().as_config()) == IntensityMapping()


def test_old_config_gives_the_input_it_was_trained_with():
    """A config with only a window (or nothing) keeps the pooled linear npz fit its weights were trained with."""
    npz = np.load(sorted((DATA / "lidc-idri" / "slices").glob("*.npz"))[0])["images"][0]
    before = np.clip((npz * NPZ_TO_HU_POOLED[0] + NPZ_TO_HU_POOLED[1] + 1350.0) / 1500.0, 0.0, 1.0)
    for old in (None, {}, {"window": None}, {"mapping": "lungnlb.io.intensity.to_model_input", "window": [-600, 1500]}):
        mapping = IntensityMapping.from_config(old)
        assert np.allclose(mapping(npz, "normalized"), before, atol=1e-6)
        hu = np.array([-2000.0, -600.0, 300.0])
        assert np.allclose(mapping(hu, "hu"), to_model_input(hu, "hu"))
    assert not np.allclose(to_model_input(npz, "normalized"), before, atol=1e-3), "the library's rule is the new one"


def test_shipped_weights_record_their_mapping():
    """The shipped config names every kind's rule with its constants, and the Predictor maps exactly by them
    (not by whatever the library's constants are now)."""
    config = json.loads((ROOT / "lungnlb" / "weights" / "default.json").read_text())
    recorded = config["intensity"]
    assert {"window", "normalized", "crops8bit"} <= set(recorded)
    assert all("rule" in recorded[kind] for kind in ("normalized", "crops8bit"))
    predictor = Predictor(torch.nn.Identity(), config)  # only the input mapping is used
    npz = np.load(sorted((DATA / "lidc-idri" / "slices").glob("*.npz"))[0])["images"][0]
    expected = IntensityMapping.from_config(json.loads(json.dumps(recorded)))(npz, "normalized")
    assert np.array_equal(predictor.model_input(npz, "normalized"), expected)
    assert not np.array_equal(expected, IntensityMapping.from_config({"window": None})(npz, "normalized"))


def _unevenness(grey: np.ndarray) -> float:
    """Coefficient of variation of the histogram of the upper grey levels (130..249): 0 when flat."""
    counts = np.bincount(grey[grey >= 125].astype(np.int64), minlength=256)[130:250]
    return float(counts.std() / counts.mean())


def test_iq_othnccd_jpegs_are_histogram_equalised_not_windowed():
    """Why ``"windowed8bit"`` has no HU step: in every tenth IQ-OTH/NCCD JPEG no pixel lies between
    the black background and the patient, and the patient's grey levels are spread evenly over the
    upper half of the range, where a real CT slice through a reading window keeps its tissues' peaks."""
    from lungnlb.io import read_image

    files = sorted((DATA / "iq-othnccd").glob("*/*.jpg"))[::10]
    assert len(files) > 50
    for path in files:
        grey = read_image(path).array
        assert not ((grey >= 16) & (grey < 110)).any(), path
        assert _unevenness(grey) < 0.5, path
    hu = read_image(ROOT / "sample_data" / "studies" / "Lung_Dx-A0001_2.000000-5mm-40805.nii.gz", "hu").array
    windowed = np.clip((hu[len(hu) // 2] + 125.0) / 350.0 * 255.0, 0, 255)  # width 350, centre 50 HU
    assert _unevenness(windowed) > 0.5
