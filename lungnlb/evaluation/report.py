"""The evaluation report: headline figures, patient-resampled intervals, per-source and per-patient tables.

Top-level keys (one number each; `lungnlb.evaluation.scoring` says which slices count where):

    dice, iou     mean of per-slice values over the tumour slices (reference non-empty), at the
                  model's threshold: not a pixel-pooled Dice
    precision, recall, f1, specificity
                  slice classification from counts over the classified slices (tumour probability >
                  threshold); specificity is None where the set has no tumour-free slice
    n_patients, n_slices

Beside them: ``ci`` (95% percentile bootstrap intervals resampling patients, every slice of a drawn
patient with it), ``coverage`` (what each figure is computed over), ``by_source``, ``by_patient``,
``patients_without_reference`` (counted, never silently dropped), ``readers`` (crops with several
radiologists: the model against the consensus and against each reader, and the human reference)
and ``tumour_free`` (whole slices only: classifier specificity and false-positive rate,
false-positive components per tumour-free slice, lesion-level sensitivity, FROC from MONAI, and
the calls per CT series, whose reconstructions of one scan can differ).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lungnlb.evaluation.metrics import patient_bootstrap_ci
from lungnlb.evaluation.scoring import SliceTable

HEADLINE = ("dice", "iou", "precision", "recall", "f1", "specificity")
FROC_FALSE_POSITIVES = (0.125, 0.25, 0.5, 1, 2, 4, 8)  # per slice, where the FROC score averages sensitivity
POLICY = ("Dice and IoU: mean of per-slice values over slices whose reference mask is non-empty. "
          "Precision, recall, F1, specificity: slice classification (neoplasm present) at the checkpoint "
          "threshold, from counts. Tumour-free slices: whole slices with an empty reference or class 0; "
          "crops never count as tumour-free. 95% intervals: percentile bootstrap over patients.")


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def segmentation(table: SliceTable, rows: np.ndarray, key: str = "dice") -> float | None:
    """Mean per-slice Dice (or IoU) over the tumour slices among ``rows``."""
    rows = np.asarray(rows, int)
    return _mean(getattr(table, key)[rows][table.tumour[rows]])


def classification(table: SliceTable, rows: np.ndarray) -> dict[str, float | None]:
    """Precision, recall, F1 and specificity from the counts of the classified slices among ``rows``."""
    rows = np.asarray(rows, int)
    known = table.label[rows] >= 0
    labels, calls = table.label[rows][known] == 1, table.positive_call[rows][known]
    tp, fp = int(np.sum(calls & labels)), int(np.sum(calls & ~labels))
    fn, tn = int(np.sum(~calls & labels)), int(np.sum(~calls & ~labels))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": precision, "recall": recall, "f1": f1, "specificity": tn / (tn + fp) if tn + fp else None}


def headline(table: SliceTable, rows: np.ndarray | None = None) -> dict[str, Any]:
    """The top-level figures over ``rows`` (all slices when None)."""
    rows = np.arange(len(table)) if rows is None else np.asarray(rows, int)
    figures = {"dice": segmentation(table, rows, "dice"), "iou": segmentation(table, rows, "iou")}
    figures.update(classification(table, rows))
    return figures | {
        "n_patients": int(len(set(table.patient[rows]))), "n_slices": int(len(rows)),
        "n_tumour_slices": int(table.tumour[rows].sum()), "n_tumour_free_slices": int(table.tumour_free[rows].sum()),
        "n_classified_slices": int((table.label[rows] >= 0).sum()),
    }


def intervals(table: SliceTable, n_bootstrap: int, seed: int) -> dict[str, tuple[float, float] | None]:
    """95% intervals of the headline figures, resampling patients."""
    if n_bootstrap <= 0:
        return {}
    statistics = {"dice": lambda idx: segmentation(table, idx, "dice"), "iou": lambda idx: segmentation(table, idx, "iou")}
    for key in ("precision", "recall", "f1", "specificity"):
        statistics[key] = lambda idx, key=key: classification(table, idx)[key]
    return {key: patient_bootstrap_ci(statistic, table.patient, n_bootstrap, seed) for key, statistic in statistics.items()}


def coverage(table: SliceTable) -> dict[str, str]:
    """What each headline figure is computed over, in words."""
    def describe(mask: np.ndarray, what: str) -> str:
        return f"{int(mask.sum())} {what} of {len(set(table.patient[mask]))} patients"

    known = table.label >= 0
    return {
        "dice": describe(table.tumour, "tumour slices (per-slice mean)"),
        "iou": describe(table.tumour, "tumour slices (per-slice mean)"),
        "precision": describe(known, "classified slices"), "recall": describe(known & (table.label == 1), "tumour-labelled slices"),
        "f1": describe(known, "classified slices"),
        "specificity": describe(known & (table.label == 0), "tumour-free-labelled slices"),
    }


def by_patient(table: SliceTable) -> list[dict[str, Any]]:
    """One row per patient: source, slices, tumour slices, Dice, classification calls, false positives."""
    rows = []
    for patient in sorted(set(table.patient)):
        idx = np.flatnonzero(table.patient == patient)
        tumour_free = idx[table.tumour_free[idx]]
        rows.append({
            "patient": patient, "source": "+".join(sorted(set(table.source[idx]))), "n_slices": len(idx),
            "n_tumour_slices": int(table.tumour[idx].sum()), "dice": segmentation(table, idx),
            "n_tumour_free_slices": len(tumour_free),
            "tumour_free_called_tumour": int(table.positive_call[tumour_free].sum()),
            "reader_dice": _mean(np.concatenate([table.reader_dice[i] for i in idx] or [[]])),
        } | {key: value for key, value in classification(table, idx).items() if key in ("recall", "specificity")})
    return rows


def readers(table: SliceTable) -> dict[str, Any] | None:
    """Model vs consensus and vs each reader, and the readers among themselves (crops with reader masks)."""
    with_readers = np.array([bool(values) or bool(human) for values, human in zip(table.reader_dice, table.human_dice)])
    if not with_readers.any():
        return None

    def pooled(column: list[list[float]], rows: np.ndarray) -> dict[str, Any]:
        per_patient = [np.mean(values) for p in sorted(set(table.patient[rows]))
                       if (values := [v for i in rows if table.patient[i] == p for v in column[i]])]
        values = [v for i in rows for v in column[i]]
        return {"mean_over_slices": _mean(np.array(values)), "mean_over_patients": _mean(np.array(per_patient)),
                "n_pairs": len(values), "n_patients": len(per_patient)}

    rows = np.flatnonzero(with_readers)
    return {
        "model_vs_consensus": {"dice": segmentation(table, rows), "n_slices": int(table.tumour[rows].sum())},
        "model_vs_each_reader": pooled(table.reader_dice, rows),
        "human_reference": pooled(table.human_dice, rows),
        "definition": "model_vs_each_reader: Dice against every reader who drew on the slice, mean over "
                      "(slice, reader) pairs; human_reference: each such reader against >= 2 of the other "
                      "readers, where those agree on something.",
    }


def tumour_free(table: SliceTable) -> dict[str, Any] | None:
    """Whole-slice figures: specificity, false-positive components, lesion sensitivity, FROC."""
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    free = np.flatnonzero(table.tumour_free)
    detection = np.flatnonzero(table.detection)
    if not len(free) and not len(detection):
        return None
    labelled_free = free[table.label[free] == 0]
    lesions = int(table.lesions[detection].sum())
    report: dict[str, Any] = {
        "n_tumour_free_slices": len(free), "n_patients": len(set(table.patient[free])),
        "specificity": _mean(~table.positive_call[labelled_free]),
        "false_positive_rate": _mean(table.positive_call[labelled_free]),
        "false_positive_components_per_slice": _mean(table.false_positive_components[free[table.detection[free]]]),
        "slices_with_false_positive_mask": _mean(table.false_positive_components[free[table.detection[free]]] > 0),
        "n_lesions": lesions, "lesion_sensitivity": float(table.found[detection].sum() / lesions) if lesions else None,
        "by_series": tumour_free_by_series(table, labelled_free),
    }
    if lesions:
        tp_scores = np.array([s for i in detection for s in table.lesion_scores[i]], np.float32)
        fp_scores = np.array([s for i in detection for s in table.false_positive_scores[i]], np.float32)
        fps, sensitivity = compute_froc_curve_data(fp_scores, tp_scores, lesions, len(detection))
        report["froc"] = {
            "false_positives_per_slice": [float(v) for v in fps], "sensitivity": [float(v) for v in sensitivity],
            "score": float(compute_froc_score(fps, sensitivity, FROC_FALSE_POSITIVES)),
            "score_at": list(FROC_FALSE_POSITIVES), "n_slices": len(detection),
        }
    return report


def tumour_free_by_series(table: SliceTable, rows: np.ndarray) -> list[dict[str, Any]]:
    """Tumour-free slices called tumour per image that holds several of ``rows`` (a CT series: two
    reconstructions of one scan can differ, and a JPEG slice alone says nothing)."""
    images, counts = np.unique(table.image[rows], return_counts=True)
    series = []
    for image in images[counts > 1]:
        idx = rows[table.image[rows] == image]
        series.append({"image_id": image, "patient": table.patient[idx[0]], "n_tumour_free_slices": len(idx),
                       "called_tumour": int(table.positive_call[idx].sum())})
    return series


def build_report(table: SliceTable, threshold: float, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The whole report over ``table`` (see the module docstring)."""
    report = {"policy": POLICY, "threshold": threshold, **headline(table)}
    report["ci"] = intervals(table, n_bootstrap, seed)
    report["coverage"] = coverage(table)
    report["by_source"] = {}
    for source in sorted(set(table.source)):
        part = table.subset(np.flatnonzero(table.source == source))
        report["by_source"][source] = headline(part) | {"ci": intervals(part, n_bootstrap, seed)}
    report["by_patient"] = by_patient(table)
    without = sorted(set(table.patient) - set(table.patient[table.tumour]))
    report["patients_without_reference"] = {"count": len(without), "patients": without}
    report["readers"] = readers(table)
    report["tumour_free"] = tumour_free(table)
    return report
