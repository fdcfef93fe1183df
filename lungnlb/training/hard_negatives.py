"""Hard negatives: crops of training slices around what a trained model marks where the truth has no tumour.

Patches drawn uniformly over the body rarely fall on the few vessels, airway walls and pleural
folds a native-resolution model confuses with a nodule, so a model trained that way keeps marking
them, even on the slices it trained on. Hard-example mining (as detectors do it, Shrivastava et
al. 2016, here offline) takes one pass of a trained checkpoint over the whole training slices, at
the checkpoint's own threshold and with its own post-processing (`Predictor.predict_normalized`,
so these are the false alarms a user would see), and turns each predicted
8-connected component lying at least ``clearance_px`` from every truth pixel into a training
sample: the ``size`` x ``size`` crop of the slice centred on the component (shifted to stay inside
the slice), with the truth cut the same way. A 64 px patch drawn anywhere in a 96 px crop holds
the crop's centre, which is the component's unless the crop had to be shifted at the border.

Only whole slices are mined (both sides >= `lungnlb.inference.LUNG_FIELD_MIN_SIZE`) whose every
pixel has a known truth: a lesion mask, or a tumour-free slice (mask all background).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from lungnlb.inference import LUNG_FIELD_MIN_SIZE, Predictor
from lungnlb.training.dataset import SliceSample

CROP_SIZE = 96
CLEARANCE_PX = 5


def minable(sample: SliceSample) -> bool:
    """A whole slice whose truth is known at every pixel."""
    whole = min(sample.image.shape) >= LUNG_FIELD_MIN_SIZE
    return whole and not sample.hard_negative and (sample.mask is not None or sample.class_label == 0)


def false_alarm_centres(predicted: np.ndarray, truth: np.ndarray, clearance_px: int) -> list[tuple[int, int]]:
    """(row, column) centres of the 8-connected components of ``predicted`` (H, W) bool with no
    pixel within ``clearance_px`` (Chebyshev) of ``truth`` (H, W) bool."""
    near_truth = ndimage.binary_dilation(truth, np.ones((3, 3), bool), iterations=clearance_px) if truth.any() else truth
    labels, count = ndimage.label(predicted, np.ones((3, 3), bool))
    touching = set(np.unique(labels[near_truth]).tolist())
    centres = ndimage.center_of_mass(predicted, labels, range(1, count + 1))
    return [(int(r + 0.5), int(c + 0.5)) for index, (r, c) in enumerate(centres, start=1) if index not in touching]


def crop_around(shape: tuple[int, int], centre: tuple[int, int], size: int) -> tuple[slice, slice]:
    """The ``size`` x ``size`` box centred on ``centre``, shifted to lie inside ``shape`` (or the whole side if shorter)."""
    box = []
    for length, middle in zip(shape, centre):
        start = min(max(0, middle - size // 2), max(0, length - size))
        box.append(slice(start, min(length, start + size)))
    return box[0], box[1]


def mine_hard_negatives(predictor: Predictor, samples: list[SliceSample], size: int = CROP_SIZE,
                        clearance_px: int = CLEARANCE_PX) -> list[SliceSample]:
    """Hard-negative crops (``hard_negative=True``) of the minable ``samples`` under ``predictor``'s checkpoint."""
    mined = []
    for sample in filter(minable, samples):
        predicted = predictor.predict_normalized(sample.image[None])[0][0] > predictor.threshold
        truth = np.zeros(sample.image.shape, bool) if sample.mask is None else sample.mask.astype(bool)
        for number, centre in enumerate(false_alarm_centres(predicted, truth, clearance_px)):
            box = crop_around(sample.image.shape, centre, size)
            mask = truth[box]
            mined.append(dataclasses.replace(
                sample, image_id=f"{sample.image_id}#hard{number}", image=np.ascontiguousarray(sample.image[box]),
                mask=mask.copy(), class_label=int(mask.any()), hard_negative=True))
    return mined
