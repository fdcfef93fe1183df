"""MONAI dictionary augmentation for (image, mask) training pairs.

Geometric transforms act on both keys (image bilinear, mask nearest); intensity jitter on the
image only, clipped back to the model's [0, 1] input range:

    left-right flip (p=0.5) -> affine: rotation U(-rotate_deg, rotate_deg), isotropic-ish scale
    1 + U(-scale, scale) (p=0.7) -> intensity scale x(1 + U(-0.1, 0.1)) and shift U(-0.05, 0.05)
    (p=0.5 each) -> contrast gamma U(0.8, 1.25) (p=0.3) -> scanner variety: Gaussian noise
    (p=0.15), blur (p=0.1), low resolution, zoom 0.5-1 (p=0.1) -> clip to [0, 1]

With ``kernel_prob`` p > 0, a reconstruction-kernel step comes before the noise: a softer kernel,
Gaussian blur sigma U(0.75, 1.5) px (p), and a sharper one, unsharp mask
b + alpha (b - G_0.7(b)), b = G_s(x), s U(0.3, 0.5) px, alpha U(1, 2.5) (p): the shipped model calls
a CT series by its sharpness (`experiments/kernel_sensitivity.py`). p = 0 leaves the steps out, so
the draws of the recipes before stay as they were.

Native-resolution training (`patch_transforms`) first pads each slice with air to at least one
patch and draws a patch at the slice's own pixel size, centred on the lesion with probability
``pos_fraction`` and elsewhere in the body otherwise (MONAI `RandCropByPosNegLabeld`; background
centres only where the image is brighter than air, so no patch is empty air outside the patient).
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    ScaleIntensityRanged,
    SpatialPadd,
)

KEYS = ("image", "mask")


def kernel_steps(prob: float) -> list:
    """A softer and a sharper reconstruction kernel, each with probability ``prob`` (none at 0)."""
    if prob <= 0.0:
        return []
    return [RandGaussianSmoothd(keys="image", prob=prob, sigma_x=(0.75, 1.5), sigma_y=(0.75, 1.5)),
            RandGaussianSharpend(keys="image", prob=prob, sigma1_x=(0.3, 0.5), sigma1_y=(0.3, 0.5),
                                 sigma2_x=0.7, sigma2_y=0.7, alpha=(1.0, 2.5))]


def augmentation(rotate_deg: float = 10.0, scale: float = 0.1, kernel_prob: float = 0.0) -> list:
    """The random augmentation steps for items {"image": (1, H, W), "mask": (1, H, W)}."""
    return [
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
        RandAffined(
            keys=KEYS,
            prob=0.7,
            rotate_range=(math.radians(rotate_deg),),
            scale_range=(scale, scale),
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
        *kernel_steps(kernel_prob),
        RandGaussianNoised(keys="image", prob=0.15, std=0.02),
        RandGaussianSmoothd(keys="image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
        RandSimulateLowResolutiond(keys="image", prob=0.1, upsample_mode="bilinear", zoom_range=(0.5, 1.0)),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]


def train_transforms(seed: int, rotate_deg: float = 10.0, scale: float = 0.1) -> Compose:
    """Random augmentation for whole-slice training items, seeded."""
    transform = Compose(augmentation(rotate_deg, scale))
    transform.set_random_state(seed=seed)
    return transform


def patch_transforms(seed: int, patch_size: int, air: float, pos_fraction: float = 0.5, augment: bool = True,
                     kernel_prob: float = 0.0) -> Compose:
    """Pad with air, draw one native-resolution patch (lesion-centred with probability ``pos_fraction``), augment."""
    if not 0.0 < pos_fraction < 1.0:
        raise ValueError(f"pos_fraction must be in (0, 1), got {pos_fraction}")
    size = (patch_size, patch_size)
    steps = [
        SpatialPadd(keys="image", spatial_size=size, value=air),
        SpatialPadd(keys="mask", spatial_size=size, value=0),
        RandCropByPosNegLabeld(keys=KEYS, label_key="mask", spatial_size=size, pos=pos_fraction, neg=1 - pos_fraction,
                               num_samples=1, image_key="image", image_threshold=air + 0.05),
    ]
    transform = Compose(steps + (augmentation(kernel_prob=kernel_prob) if augment else []))
    transform.set_random_state(seed=seed)
    return transform
