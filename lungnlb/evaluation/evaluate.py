"""Evaluate a model on the labelled slices of a prepared studies folder, at each image's own resolution.

Every labelled slice (see `lungnlb.training.dataset.slice_plan`) goes through `Predictor`
(intensity mapping, resize to the model's input size and back). Segmentation is scored against
the mask at full resolution, classification against the slice's class label; the policy for
tumour-free slices is the one of `lungnlb.evaluation.metrics` (Dice / IoU over tumour slices only,
false-positive rate over tumour-free slices). 95% intervals: percentile bootstrap over slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungnlb.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    per_slice_segmentation,
    summarize_segmentation,
)
from lungnlb.inference import Predictor
from lungnlb.training.dataset import IMAGE_SUFFIX, read_records, slice_plan

POLICY = ("Dice and IoU are averaged over slices whose reference mask is non-empty (tumour slices); "
          "tumour-free slices with a mask are scored by the false-positive rate (share with a non-empty "
          "predicted mask). Precision, recall and F1 are for 'neoplasm present' at the checkpoint threshold. "
          "95% intervals: percentile bootstrap over slices.")


@dataclass
class SliceResult:
    """One evaluated slice: the model input image in [0, 1], reference mask, predictions."""

    image_id: str
    case: str
    source: str
    z: int
    image: np.ndarray
    mask: np.ndarray | None
    probability: np.ndarray | None
    class_label: int | None
    score: float


def predict_folder(
    studies: str | Path, predictor: Predictor, image_ids: list[str] | None = None, progress: bool = False
) -> list[SliceResult]:
    """Predict every labelled slice of the (selected) images of a prepared studies folder."""
    from lungnlb.io import read_image

    studies = Path(studies)
    records = read_records(studies)
    if image_ids is not None:
        wanted = set(image_ids)
        records = [record for record in records if record["image_id"] in wanted]
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="evaluating", unit="image")
    results = []
    for record in records:
        image = read_image(studies / f"{record['image_id']}{IMAGE_SUFFIX}")
        mask_path = studies / "labels" / "original" / f"{record['image_id']}{IMAGE_SUFFIX}"
        mask = read_image(mask_path).array > 0.5 if mask_path.is_file() else None
        volume = predictor.model_input(image.array, record.get("intensity", image.intensity))
        volume = volume[None] if volume.ndim == 2 else volume
        mask = None if mask is None else (mask[None] if mask.ndim == 2 else mask)
        plan = slice_plan(record, None if mask is None else (mask[0] if image.array.ndim == 2 else mask),
                          image.array.ndim)
        if not plan:
            continue
        zs = [z for z, _, _ in plan]
        probabilities, scores = predictor.predict_normalized(volume[zs])
        for index, (z, has_mask, label) in enumerate(plan):
            results.append(SliceResult(
                record["image_id"], record["case"], record["source"], z, volume[z],
                mask[z] if has_mask else None,
                None if probabilities is None else probabilities[index], label, float(scores[index])))
    return results


def summarize(results: list[SliceResult], threshold: float = 0.5, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Metrics with 95% bootstrap intervals over the given slice results."""
    report: dict[str, Any] = {"policy": POLICY, "threshold": threshold, "n_slices": len(results)}
    seg = [r for r in results if r.mask is not None and r.probability is not None]
    if seg:
        per_slice = per_slice_segmentation([r.probability for r in seg], [r.mask for r in seg], threshold)
        report.update(summarize_segmentation(per_slice))
        report["ci"] = _segmentation_ci(per_slice, n_bootstrap, seed)
    cls = [r for r in results if r.class_label is not None]
    if cls:
        scores = np.array([r.score for r in cls])
        labels = np.array([r.class_label for r in cls])
        report.update(classification_metrics(scores, labels, threshold))
        ci = report.setdefault("ci", {})
        for key in ("precision", "recall", "f1"):
            ci[key] = bootstrap_ci(lambda idx: classification_metrics(scores[idx], labels[idx], threshold)[key],
                                   len(cls), n_bootstrap, seed)
    return report


def _segmentation_ci(per_slice: dict[str, np.ndarray], n_bootstrap: int, seed: int) -> dict[str, Any]:
    ci = {}
    tumour = np.flatnonzero(per_slice["tumour"])
    empty = np.flatnonzero(~per_slice["tumour"])
    for key in ("dice", "iou"):
        values = per_slice[key][tumour]
        ci[key] = bootstrap_ci(lambda idx: float(np.mean(values[idx])), len(values), n_bootstrap, seed)
    false_positive = per_slice["false_positive"][empty].astype(float)
    ci["false_positive_rate"] = bootstrap_ci(lambda idx: float(np.mean(false_positive[idx])),
                                             len(false_positive), n_bootstrap, seed)
    return ci


def evaluate(
    studies: str | Path, predictor: Predictor, image_ids: list[str] | None = None, n_bootstrap: int = 1000,
    seed: int = 0, progress: bool = False,
) -> tuple[dict[str, Any], list[SliceResult]]:
    """Predict and score a prepared studies folder: (report with "by_source" breakdown, slice results)."""
    results = predict_folder(studies, predictor, image_ids, progress)
    if not results:
        raise ValueError(f"no labelled slices (masks or class labels) to evaluate in {studies}")
    report = summarize(results, predictor.threshold, n_bootstrap, seed)
    report["by_source"] = {
        source: summarize([r for r in results if r.source == source], predictor.threshold, 0)
        for source in sorted({r.source for r in results})
    }
    for entry in report["by_source"].values():
        entry.pop("policy", None)
        entry.pop("ci", None)
    return report, results


def to_markdown(report: dict[str, Any], title: str = "LungNLB evaluation") -> str:
    """A Markdown table of the headline metrics with their 95% intervals, then per source."""
    lines = [f"# {title}", "", report["policy"], "", "| metric | value | 95% CI |", "|---|---|---|"]
    ci = report.get("ci", {})
    for key in ("dice", "iou", "false_positive_rate", "precision", "recall", "f1", "average_precision"):
        if report.get(key) is not None:
            interval = ci.get(key)
            text = f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else ""
            lines.append(f"| {key} | {report[key]:.3f} | {text} |")
    counts = [f"{key} = {report[key]}" for key in ("n_tumour_slices", "n_tumour_free_slices", "n_positive",
                                                   "n_negative") if key in report]
    lines += ["", "Slices: " + ", ".join(counts), "", "| source | dice | iou | FP rate | precision | recall | f1 |",
              "|---|---|---|---|---|---|---|"]
    for source, entry in report.get("by_source", {}).items():
        cells = [_cell(entry.get(k)) for k in ("dice", "iou", "false_positive_rate", "precision", "recall", "f1")]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
