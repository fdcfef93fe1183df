"""Evaluation: slice-level metrics with bootstrap intervals, reports and figures."""

from .evaluate import POLICY, SliceResult, evaluate, predict_folder, summarize, to_markdown
from .metrics import bootstrap_ci, classification_metrics, dice_iou, per_slice_segmentation, summarize_segmentation

__all__ = [
    "POLICY", "SliceResult", "bootstrap_ci", "classification_metrics", "dice_iou", "evaluate",
    "per_slice_segmentation", "predict_folder", "summarize", "summarize_segmentation", "to_markdown",
]
