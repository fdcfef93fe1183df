"""MONAI dictionary augmentation for (image, mask) training pairs.

Geometric transforms act on both keys (image bilinear, mask nearest); intensity jitter on the
image only, clipped back to the model's [0, 1] input range:

    left-right flip (p=0.5) -> affine: rotation U(-rotate_deg, rotate_deg), isotropic-ish scale
    1 + U(-scale, scale) (p=0.7) -> intensity scale x(1 + U(-0.1, 0.1)) and shift U(-0.05, 0.05)
    (p=0.5 each) -> contrast gamma U(0.8, 1.25) (p=0.3) -> clip to [0, 1]
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)

KEYS = ("image", "mask")


def train_transforms(seed: int, rotate_deg: float = 10.0, scale: float = 0.1) -> Compose:
    """Random augmentation for training items {"image": (1, H, W), "mask": (1, H, W)}, seeded."""
    transform = Compose(
        [
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandAffined(
                keys=KEYS,
                prob=0.7,
                rotate_range=(math.radians(rotate_deg),),
                scale_range=(scale, scale),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform
