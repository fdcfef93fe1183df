"""The slice probe: a linear whole-slice classifier on the frozen encoder, for one intensity kind,
fitted as the training engine's last step, its call joined to the mask's by `Predictor`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import TINY_KWARGS, synthetic_studies, write_study

from lungnlb.inference import Predictor
from lungnlb.networks import build_model
from lungnlb.slice_probe import SliceProbe, window_corners
from lungnlb.training.slice_probe import fit_slice_probe
from lungnlb.training.trainer import TrainConfig, train

PATCH = 32
FEATURES = 2 * TINY_KWARGS["features"][4]


def _probe(intercept: float, threshold: float = 0.5, dim: int = FEATURES) -> SliceProbe:
    return SliceProbe("windowed8bit", np.zeros(dim), np.ones(dim), np.zeros(dim), intercept, threshold)


def _silent_predictor(probe: SliceProbe | None) -> Predictor:
    """A tiny native model whose masks are empty everywhere (final bias -20)."""
    torch.manual_seed(0)
    model = build_model("unet_sl_nlb", **TINY_KWARGS)
    with torch.no_grad():
        model.unet.final_conv.bias.fill_(-20.0)
    config = {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}, "input_size": [PATCH, PATCH],
              "patch_size": [PATCH, PATCH], "threshold": 0.2}
    if probe is not None:
        config["slice_probe"] = probe.as_config()
    return Predictor(model, config, precision="float32")


def test_the_probe_threshold_lands_on_the_models_threshold():
    probe = _probe(0.0, threshold=0.7)
    p = np.array([0.01, 0.5, 0.69, 0.7001, 0.9, 0.999])
    shifted = probe.on_model_scale(p, 0.2)
    assert np.array_equal(shifted >= 0.2, p >= 0.7)
    assert np.all(np.diff(shifted) > 0)


def test_a_probe_survives_its_config_and_a_malformed_one_is_refused():
    rng = np.random.default_rng(0)
    probe = SliceProbe("windowed8bit", rng.normal(size=6), rng.uniform(1, 2, 6), rng.normal(size=6), 0.3, 0.6,
                       {"C": 0.01})
    again = SliceProbe.from_config(json.loads(json.dumps(probe.as_config())))
    features = rng.normal(size=(4, 6))
    assert np.allclose(again.probability(features), probe.probability(features))
    assert again.threshold == 0.6 and again.fit == {"C": 0.01}
    assert SliceProbe.from_config(None) is None
    with pytest.raises(ValueError, match="one length"):
        SliceProbe.from_config({**probe.as_config(), "coef": [0.0] * 5})


def test_windows_cover_the_box_at_half_a_window_and_stay_inside_the_slice():
    box, window, shape = (slice(5, 100), slice(0, 50)), 32, (120, 60)
    corners = window_corners(box, window, shape)
    covered = np.zeros(shape, bool)
    for y, x in corners:
        assert 0 <= y <= shape[0] - window and 0 <= x <= shape[1] - window
        covered[y:y + window, x:x + window] = True
    assert covered[box].all()
    assert sorted({y for y, _ in corners})[:3] == [5, 21, 37]


def test_features_are_the_mean_and_maximum_over_windows_and_a_tiny_slice_is_refused():
    predictor = _silent_predictor(None)
    features = predictor.slice_probe_features(np.random.default_rng(0).uniform(0, 1, (64, 80)).astype(np.float32))
    half = FEATURES // 2
    assert features.shape == (FEATURES,) and np.all(features[:half] <= features[half:] + 1e-6)
    with pytest.raises(ValueError, match="smaller than the probe's 32 px window"):
        predictor.slice_probe_features(np.zeros((20, 20), np.float32))


@pytest.mark.parametrize("intercept, called", [(20.0, True), (-20.0, False)])
def test_the_probe_calls_slices_of_its_kind_only_and_never_adds_an_outline(intercept, called):
    predictor = _silent_predictor(_probe(intercept))
    jpeg = np.random.default_rng(1).uniform(0, 255, (64, 64)).astype(np.float32)
    result = predictor.predict(jpeg, "windowed8bit")
    assert (result.slice_probability >= predictor.threshold) == called
    assert not (result.probability > predictor.threshold).any()
    hu = np.random.default_rng(1).normal(-700, 200, (64, 64)).astype(np.float32)
    assert predictor.predict(hu, "hu").slice_probability < predictor.threshold


def test_the_fit_keeps_the_best_f1_within_a_tenth_of_the_validation_normals():
    rng = np.random.default_rng(0)

    def draw(n_tumour: int, n_normal: int):
        labels = np.r_[np.ones(n_tumour, bool), np.zeros(n_normal, bool)]
        return rng.normal(labels[:, None] * 1.5, 1.0, (len(labels), 4)), labels

    probe = fit_slice_probe(draw(60, 60), draw(30, 20))
    row = probe.fit["validation"]
    assert row["normals_called_tumour"] <= 2 and row["normal_slices"] == 20
    assert 0.5 < row["f1"] <= 1.0 and probe.coef.shape == (4,)
    few_normals = (np.r_[np.zeros((5, 4)), np.full((1, 4), 9.0)], np.r_[np.ones(5, bool), False])
    with pytest.raises(ValueError, match="at most 0 of the 1 validation normals"):
        fit_slice_probe(draw(20, 20), few_normals)


def _studies_with_jpegs(root):
    studies = synthetic_studies(root, n_cases=4, size=40)
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:64, :64]
    blocks = {"train": [(f"t{i}", i % 2) for i in range(8)], "val": [(f"v{i}", int(i < 4)) for i in range(14)]}
    for subset, items in blocks.items():
        for name, label in items:
            image = rng.uniform(90, 150, (64, 64)).astype(np.float32)
            if label:
                image[(yy - 30) ** 2 + (xx - 34) ** 2 < 60] = 230.0
            write_study(studies, name, image, {"source": "synthetic8bit", "case": name, "intensity": "windowed8bit",
                                               "class_label": label, "label_method": None, "labelled_slices": []}, None)
    cases = {"train": [f"case{c}" for c in range(4)] + ["block0", "block2"] + [n for n, _ in blocks["train"]],
             "val": [n for n, _ in blocks["val"]], "test": []}
    (root / "split.json").write_text(json.dumps({"cases": cases}))
    return studies


def test_training_fits_the_probe_into_the_best_checkpoint_only(tmp_path):
    studies = _studies_with_jpegs(tmp_path)
    common = dict(data=str(studies), model="unet_sl_nlb", model_kwargs=TINY_KWARGS, patch_size=PATCH, steps=2,
                  batch_size=4, val_every=2, split=str(tmp_path / "split.json"), progress=False, tensorboard=False)
    result = train(TrainConfig(out=str(tmp_path / "run"), **common))
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["slice_probe"]["fit"]["train_slices"] == 10  # 8 + the two 8-bit blocks of synthetic_studies
    assert best["slice_probe"]["fit"]["validation"]["normal_slices"] == 10
    assert len(best["slice_probe"]["coef"]) == FEATURES
    assert result["metrics"]["slice_probe"] == best["slice_probe"]["fit"]["validation"]
    assert "slice_probe" not in json.loads((tmp_path / "run" / "last.json").read_text())
    assert Predictor.from_checkpoint(result["best"]).slice_probe is not None
    train(TrainConfig(out=str(tmp_path / "off"), slice_probe=False, **common))
    assert "slice_probe" not in json.loads((tmp_path / "off" / "best.json").read_text())


def test_a_fine_tuned_checkpoint_drops_the_probe_of_its_base():
    from lungnlb.training.fine_tune import published_config

    base = {"model": {"name": "unet_sl_nlb"}, "threshold": 0.2, "slice_probe": _probe(1.0).as_config(),
            "format": "old", "intensity": {"window": [-600, 1500]}}
    published = published_config(base, {"threshold": 0.3, "metrics": {"dice": 0.7}})
    assert "slice_probe" not in published and "format" not in published
    assert published["threshold"] == 0.3 and published["intensity"] == base["intensity"]


def test_the_shipped_weights_call_the_sample_jpegs_by_their_class():
    """The bundled sample's two IQ-OTH/NCCD JPEGs (training blocks: a check of the served path, not
    of generalisation, which docs/results.md measures on held-out blocks)."""
    from pathlib import Path

    from lungnlb.data.studies import image_path, read_study_image

    predictor = Predictor.from_checkpoint(None)
    assert predictor.slice_probe is not None and predictor.slice_probe.intensity == "windowed8bit"
    sample = Path(__file__).resolve().parents[1] / "sample_data" / "studies"
    for image_id, tumour in (("iq-othnccd_malignant_001", True), ("iq-othnccd_normal_001", False)):
        image = read_study_image(image_path(sample, image_id))
        plane = image.array.reshape(image.array.shape[-2:])
        assert (predictor.predict(plane, image.intensity).slice_probability >= predictor.threshold) == tumour
