"""experiments.flip_averaging: the served form is the predictor's own, and a mirror is mirrored back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import TINY_KWARGS

from experiments.flip_averaging import FORMS, FlipAveraged
from lungnlb.inference import Predictor
from lungnlb.networks import build_model

PATCH = 32


def _predictor(threshold: float = 0.5) -> Predictor:
    torch.manual_seed(0)
    model = build_model("unet_sl_nlb", **TINY_KWARGS)
    config = {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}, "input_size": [PATCH, PATCH],
              "patch_size": [PATCH, PATCH], "threshold": threshold, "min_component_pixels": 0}
    return Predictor(model, config, precision="float32")


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (2, 48, 40)).astype(np.float32)


def test_the_served_form_gives_the_predictors_own_probabilities():
    predictor, volume = _predictor(), _volume()
    served, _ = predictor.predict_normalized(volume)
    averaged, _ = FlipAveraged(predictor, FORMS["as served"]).predict_normalized(volume)
    np.testing.assert_allclose(averaged, served, atol=1e-6)


@pytest.mark.parametrize("form", ["left-right", "four mirrors"])
def test_a_mirrored_input_gives_the_mirrored_average(form):
    """The average over a group of mirrors is the same for the input and any of its mirrors, once
    mirrored back: so each mirror's probabilities were put back where they belong."""
    predictor = _predictor(threshold=0.0)
    averaged = FlipAveraged(predictor, FORMS[form])
    volume = _volume(1)
    direct, _ = averaged.predict_normalized(volume)
    mirrored, _ = averaged.predict_normalized(np.ascontiguousarray(volume[:, :, ::-1]))
    np.testing.assert_allclose(mirrored[:, :, ::-1], direct, atol=1e-5)
    served, _ = predictor.predict_normalized(volume)
    assert not np.allclose(direct, served, atol=1e-4)  # the mirrors were run, not the input twice


def test_a_whole_slice_model_is_refused():
    config = {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}, "input_size": [PATCH, PATCH], "threshold": 0.5}
    with pytest.raises(ValueError, match="native-resolution"):
        FlipAveraged(Predictor(build_model("unet_sl_nlb", **TINY_KWARGS), config, precision="float32"),
                     FORMS["left-right"])
