"""Slice-level metrics and the policy for tumour-free slices.

Segmentation (binary masks, prediction = probability > threshold):

    Dice = 2|P ∩ G| / (|P| + |G|),  IoU = |P ∩ G| / |P ∪ G|

averaged over slices whose ground-truth mask is non-empty (tumour slices) only — on a tumour-free
slice both are undefined (0/0) or 0 for any false-positive pixel, so they would measure something
else. Tumour-free slices with a mask are scored by the false-positive rate instead: the fraction of
them on which the predicted mask is non-empty.

Classification (neoplasm present = 1, score = sigmoid of the cls head, prediction = score > threshold):
precision TP/(TP+FP), recall TP/(TP+FN), F1 of the positive class, specificity TN/(TN+FP) (None
without tumour-free slices), accuracy, and the average precision (area under the precision-recall
curve, step interpolation).

Lesions (whole slices): a lesion is a connected component (8-connectivity) of the reference mask; it
is found when a predicted component overlaps it. Every predicted component that overlaps no lesion
is a false-positive component.

95% confidence intervals: percentile bootstrap (`bootstrap_ci`), over slices or over patients
(`patient_bootstrap_ci`: every slice of a drawn patient is drawn with it).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lungnlb.overlap import dice_iou


def per_slice_segmentation(
    probabilities: list[np.ndarray], masks: list[np.ndarray], threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Per-slice arrays: dice, iou (NaN on tumour-free slices), tumour (bool), false_positive (bool)."""
    dice, iou, tumour, false_positive = [], [], [], []
    for probability, mask in zip(probabilities, masks, strict=True):
        prediction = np.asarray(probability) > threshold
        has_tumour = bool(np.asarray(mask).any())
        d, i = dice_iou(prediction, mask) if has_tumour else (np.nan, np.nan)
        dice.append(d)
        iou.append(i)
        tumour.append(has_tumour)
        false_positive.append(not has_tumour and bool(prediction.any()))
    return {"dice": np.array(dice), "iou": np.array(iou), "tumour": np.array(tumour, bool),
            "false_positive": np.array(false_positive, bool)}


def summarize_segmentation(per_slice: dict[str, np.ndarray]) -> dict[str, float | int | None]:
    """Mean Dice / IoU over tumour slices, false-positive rate over tumour-free slices."""
    tumour = per_slice["tumour"]
    empty = ~tumour
    return {
        "dice": float(np.mean(per_slice["dice"][tumour])) if tumour.any() else None,
        "iou": float(np.mean(per_slice["iou"][tumour])) if tumour.any() else None,
        "false_positive_rate": float(np.mean(per_slice["false_positive"][empty])) if empty.any() else None,
        "n_tumour_slices": int(tumour.sum()),
        "n_tumour_free_slices": int(empty.sum()),
    }


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float | int]:
    """Precision, recall, F1 (positive = neoplasm), accuracy, average precision, counts."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    predicted = scores > threshold
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    tn = int(np.sum(~predicted & ~labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else 0.0,
        "average_precision": average_precision(scores, labels),
        "n_positive": int(labels.sum()),
        "n_negative": int((~labels).sum()),
    }


def lesion_detection(probability: np.ndarray, reference: np.ndarray, threshold: float = 0.5) -> dict:
    """Lesion-level outcome of one slice.

    Returns ``lesions`` (reference components), ``found`` (those overlapped by a predicted
    component), ``false_positives`` (predicted components overlapping no lesion), and the scores
    FROC needs: ``lesion_scores`` (per lesion, the highest probability among the predicted
    components that overlap it, 0 when missed) and ``false_positive_scores`` (per false-positive
    component, its highest probability).
    """
    from scipy import ndimage

    structure = np.ones((3, 3), bool)
    probability = np.asarray(probability, np.float32)
    predicted, n_predicted = ndimage.label(probability > threshold, structure)
    lesions, n_lesions = ndimage.label(np.asarray(reference, bool), structure)
    peaks = ndimage.maximum(probability, predicted, np.arange(1, n_predicted + 1)) if n_predicted else []
    peak_of = np.concatenate([[0.0], np.asarray(peaks, np.float32)])
    lesion_scores = []
    for lesion in range(1, n_lesions + 1):
        touching = np.unique(predicted[lesions == lesion])
        lesion_scores.append(float(peak_of[touching].max()))
    touching_any = set(np.unique(predicted[lesions > 0]).tolist())
    false_positive = [c for c in range(1, n_predicted + 1) if c not in touching_any]
    return {
        "lesions": n_lesions,
        "found": int(sum(score > 0 for score in lesion_scores)),
        "false_positives": len(false_positive),
        "lesion_scores": lesion_scores,
        "false_positive_scores": [float(peak_of[c]) for c in false_positive],
    }


def f1_best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold with the highest F1 (midway between the two scores it separates).

    Candidates: predict the k highest scores positive, k = 1..n; 0.5 when there are no positives.
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    if not labels.any():
        return 0.5
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    true_positives = np.cumsum(hits)
    predicted = np.arange(1, len(ranked) + 1)
    f1 = 2 * true_positives / (predicted + labels.sum())
    distinct = np.append(ranked[1:] < ranked[:-1], True)  # a cut must fall between different scores
    k = int(np.argmax(np.where(distinct, f1, -1.0)))
    below = ranked[k + 1] if k + 1 < len(ranked) else max(ranked[k] - 1e-3, 0.0)
    return float((ranked[k] + below) / 2)


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score threshold (descending scores)."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    hits = np.asarray(labels, bool)[order]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    positives = max(int(hits.sum()), 1)
    return tp / np.maximum(tp + fp, 1), tp / positives


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over descending score thresholds; 0 without positives."""
    labels = np.asarray(labels, bool)
    if not labels.any():
        return 0.0
    precision, recall = precision_recall_curve(scores, labels)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None], n_items: int, n_resamples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(indices)` resampling `n_items` items with replacement."""
    if n_items == 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        value = statistic(rng.integers(0, n_items, n_items))
        if value is not None and np.isfinite(value):
            values.append(value)
    if not values:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def patient_bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None], patients: list[str] | np.ndarray, n_resamples: int = 1000,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(slice indices)`, resampling patients with replacement.

    ``patients[i]`` is the patient of slice i; a drawn patient brings all its slices (twice if drawn twice).
    """
    patients = np.asarray(patients)
    groups = [np.flatnonzero(patients == p) for p in np.unique(patients)]
    if not groups:
        return None

    def resampled(drawn: np.ndarray) -> float | None:
        return statistic(np.concatenate([groups[g] for g in drawn]))

    return bootstrap_ci(resampled, len(groups), n_resamples, seed, level)
