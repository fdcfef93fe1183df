"""The overlay picture: written, a real PNG, and the contours change the pixels."""

import numpy as np
from PIL import Image

from lungnlb.visualize import save_overlay


def test_overlay_png_shows_the_contour(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    plain = np.asarray(Image.open(save_overlay(tmp_path / "plain.png", image)).convert("RGB"))
    drawn = np.asarray(Image.open(save_overlay(tmp_path / "drawn.png", image, mask, mask)).convert("RGB"))
    assert plain.shape == drawn.shape and plain.shape[2] == 3
    red = (drawn[..., 0] > 200) & (drawn[..., 1] < 100) & (drawn[..., 2] < 100)
    assert red.sum() > 50  # the prediction contour is drawn in red


def test_constant_image_does_not_fail(tmp_path):
    assert save_overlay(tmp_path / "flat.png", np.zeros((8, 8))).stat().st_size > 0
