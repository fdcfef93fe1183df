"""The reconstruction-kernel augmentation: absent at p = 0 (the recipes before draw as they did),
a softer and a sharper kernel at p = 1."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose

from lungnlb.training.augment import augmentation, kernel_steps, patch_transforms


def _edge() -> dict:
    image = np.full((1, 32, 32), 0.2, np.float32)
    image[:, :, 16:] = 0.6
    return {"image": torch.from_numpy(image), "mask": torch.zeros(1, 32, 32)}


def test_no_kernel_steps_at_zero_so_the_default_recipe_is_unchanged():
    from monai.transforms import RandGaussianNoised, RandGaussianSharpend

    default = [type(t) for t in augmentation()]
    assert kernel_steps(0.0) == [] and RandGaussianSharpend not in default
    with_kernel = [type(t) for t in augmentation(kernel_prob=0.5)]
    noise = with_kernel.index(RandGaussianNoised)
    assert len(with_kernel) == len(default) + 2 and with_kernel[noise - 1] is RandGaussianSharpend
    assert with_kernel[:noise - 2] + with_kernel[noise:] == default
    item = {"image": torch.rand(1, 40, 40), "mask": (torch.rand(1, 40, 40) > 0.9).float()}
    plain = patch_transforms(3, 32, air=0.0)(dict(item))[0]["image"]
    kernel = patch_transforms(3, 32, air=0.0, kernel_prob=1.0)(dict(item))[0]["image"]
    assert not torch.equal(plain, kernel)


def test_kernel_steps_soften_and_sharpen_an_edge():
    soften, sharpen = (Compose([step]) for step in kernel_steps(1.0))
    soften.set_random_state(seed=0)
    sharpen.set_random_state(seed=0)
    softened = soften(_edge())["image"][0, 16]
    sharpened = sharpen(_edge())["image"][0, 16]
    assert softened[15] > 0.21 and softened[16] < 0.59  # the edge spreads
    assert sharpened[15] < 0.2 and sharpened[16] > 0.6  # under- and overshoot beside it
    assert torch.allclose(sharpened[4:8], torch.tensor(0.2)) and torch.allclose(sharpened[-8:-4], torch.tensor(0.6))  # flat away from it (the border pads)
