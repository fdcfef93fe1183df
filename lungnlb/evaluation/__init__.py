"""Evaluation: per-patient metrics with patient-resampled intervals, readers, tumour-free slices, figures."""

from .evaluate import POLICY, evaluate, seen_cases, to_markdown
from .metrics import bootstrap_ci, classification_metrics, patient_bootstrap_ci
from .predict import SliceResult, predict_folder

__all__ = [
    "POLICY", "SliceResult", "bootstrap_ci", "classification_metrics", "evaluate",
    "patient_bootstrap_ci", "predict_folder", "seen_cases", "to_markdown",
]
