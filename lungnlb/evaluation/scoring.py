"""Per-slice outcomes of an evaluation, as one table of numpy columns (one row per slice).

Which slice counts where:
- tumour slice: its reference mask is non-empty; Dice and IoU are computed there only.
- tumour-free slice: a whole slice (never a crop) whose reference is known to be empty — an empty
  mask, or a slice class label 0 (IQ-OTH/NCCD normal cases, far slices of box-annotated CT).
- classified slice: it has a slice class label (tumour / no tumour).
- detection slice: a whole slice that is a tumour slice or tumour-free; its lesions, found lesions
  and false-positive components are counted (`lungnlb.evaluation.metrics.lesion_detection`).
- readers: on slices with per-radiologist masks, the model's Dice against each reader who drew
  something there, and the human reference: each such reader against at least 2 of the others,
  where those others agree on something.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lungnlb.evaluation.metrics import lesion_detection
from lungnlb.evaluation.predict import SliceResult
from lungnlb.overlap import dice_iou

MIN_OTHER_READERS = 2


@dataclass
class SliceTable:
    """Columns, each of length n_slices (lists where a slice has several values)."""

    patient: np.ndarray
    image: np.ndarray
    source: np.ndarray
    crop: np.ndarray
    tumour: np.ndarray
    tumour_free: np.ndarray
    dice: np.ndarray
    iou: np.ndarray
    label: np.ndarray  # slice class label, -1 where unknown
    positive_call: np.ndarray
    detection: np.ndarray
    lesions: np.ndarray
    found: np.ndarray
    false_positive_components: np.ndarray
    lesion_scores: list[list[float]]
    false_positive_scores: list[list[float]]
    reader_dice: list[list[float]]
    human_dice: list[list[float]]

    def __len__(self) -> int:
        return len(self.patient)

    def subset(self, rows: np.ndarray) -> "SliceTable":
        """The table restricted to the slice indices ``rows``."""
        rows = np.asarray(rows, int)
        return SliceTable(**{name: (value[rows] if isinstance(value, np.ndarray) else [value[i] for i in rows])
                             for name, value in vars(self).items()})


def human_agreement(readers: dict[str, np.ndarray]) -> list[float]:
    """Dice of each reader who drew on the slice against >= 2 of the others, where those agree on something."""
    masks = [np.asarray(m, bool) for m in readers.values()]
    values = []
    for i, mask in enumerate(masks):
        others = [m for j, m in enumerate(masks) if j != i]
        consensus = np.sum(others, axis=0) >= MIN_OTHER_READERS if len(others) >= MIN_OTHER_READERS else None
        if mask.any() and consensus is not None and consensus.any():
            values.append(dice_iou(mask, consensus)[0])
    return values


def _score(result: SliceResult, threshold: float) -> dict:
    reference = result.reference
    tumour = reference is not None and bool(reference.any())
    tumour_free = not result.crop and not tumour and (
        (reference is not None and result.class_label != 1) or result.class_label == 0)
    prediction = None if result.probability is None else np.asarray(result.probability, np.float32) > threshold
    dice, iou = dice_iou(prediction, reference) if tumour and prediction is not None else (np.nan, np.nan)
    row = {"tumour": tumour, "tumour_free": tumour_free, "dice": dice, "iou": iou,
           "detection": False, "lesions": 0, "found": 0, "false_positive_components": 0,
           "lesion_scores": [], "false_positive_scores": [],
           "reader_dice": [dice_iou(prediction, m)[0] for m in result.readers.values()
                           if prediction is not None and m.any()],
           "human_dice": human_agreement(result.readers)}
    if not result.crop and (tumour or tumour_free) and result.probability is not None:
        truth = reference if reference is not None else np.zeros(result.probability.shape, bool)
        detected = lesion_detection(np.asarray(result.probability, np.float32), truth, threshold)
        row.update(detection=True, lesions=detected["lesions"], found=detected["found"],
                   false_positive_components=detected["false_positives"],
                   lesion_scores=detected["lesion_scores"], false_positive_scores=detected["false_positive_scores"])
    return row


def score_slices(results: list[SliceResult], threshold: float) -> SliceTable:
    """Score every slice result at the model's threshold."""
    rows = [_score(result, threshold) for result in results]

    def column(name, dtype):
        return np.array([row[name] for row in rows], dtype=dtype)

    return SliceTable(
        patient=np.array([r.case for r in results], dtype=object),
        image=np.array([r.image_id for r in results], dtype=object),
        source=np.array([r.source for r in results], dtype=object),
        crop=np.array([r.crop for r in results], bool),
        tumour=column("tumour", bool), tumour_free=column("tumour_free", bool),
        dice=column("dice", float), iou=column("iou", float),
        label=np.array([-1 if r.class_label is None else int(r.class_label) for r in results], int),
        positive_call=np.array([r.score > threshold for r in results], bool),
        detection=column("detection", bool), lesions=column("lesions", int), found=column("found", int),
        false_positive_components=column("false_positive_components", int),
        lesion_scores=[row["lesion_scores"] for row in rows],
        false_positive_scores=[row["false_positive_scores"] for row in rows],
        reader_dice=[row["reader_dice"] for row in rows], human_dice=[row["human_dice"] for row in rows],
    )
