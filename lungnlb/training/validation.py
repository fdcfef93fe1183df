"""Validation of a model during training: what it predicts on held-out slices, the metrics, the
selection score, and the draw that keeps a long validation list affordable.

A whole-slice model predicts already-resized samples in batches and its classification threshold is
fitted (the F1-best threshold, stored as a logit offset); a native-resolution model predicts each
slice through the deployed sliding-window `Predictor` and calls a slice tumour when its mask is
non-empty, so validation measures exactly what inference does on a single slice (in a volume,
inference also counts a component's pixels through the slices: `lungnlb.inference.remove_small_components`,
which keeps more of a nodule's end slices); its mask threshold is fitted
too: of `SEG_THRESHOLDS`, the one with the best `validation_score` (Dice, slice F1 and the
specificity on the tumour-free slices, so a threshold that buys Dice or recall with false alarms
loses), stored as the checkpoint's ``threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lungnlb.evaluation.metrics import (
    classification_metrics,
    f1_best_threshold,
    per_slice_segmentation,
    summarize_segmentation,
)
from lungnlb.training.dataset import SliceSample, is_whole_tumour_free


@torch.no_grad()
def predict_samples(
    model: nn.Module, samples: list[SliceSample], device: torch.device, batch_size: int = 16
) -> tuple[list[np.ndarray] | None, np.ndarray]:
    """Mask probabilities (at the samples' size) and slice scores for already-resized samples."""
    model.eval()
    masks, scores = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = torch.from_numpy(np.stack([s.image for s in chunk])[:, None]).to(device)
        output = model(batch)
        scores.append(torch.sigmoid(output["cls"].float()).reshape(-1).cpu().numpy())
        if "seg" in output:
            masks += list(torch.sigmoid(output["seg"].float())[:, 0].cpu().numpy())
    return (masks or None), (np.concatenate(scores) if scores else np.zeros(0))


SEG_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def window_metrics(
    model: nn.Module, samples: list[SliceSample], device: torch.device, config: dict[str, Any],
    report: Callable[[float, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Native-resolution validation: each slice through the deployed sliding-window `Predictor`
    once, finished at every threshold of `SEG_THRESHOLDS` (each threshold's metrics to ``report``);
    the metrics of the best, with its ``threshold``."""
    from lungnlb.inference import Predictor

    predictor = Predictor(model, config, device=device, batch_size=16)
    raw = [predictor.window_probability(s.image[None]) for s in samples]
    best: dict[str, Any] = {}
    for threshold in SEG_THRESHOLDS:
        finished = [predictor.finish_windows(probability, field, threshold) for probability, field in raw]
        metrics = sample_metrics(samples, [p[0] for p, _ in finished], np.array([float(s[0]) for _, s in finished]),
                                 seg_threshold=threshold, cls_threshold=threshold)
        if report is not None:
            report(threshold, metrics)
        if not best or validation_score(metrics) > validation_score(best):
            best = {**metrics, "threshold": threshold, "cls_logit_offset": 0.0}
    return best


def validation_metrics(
    model: nn.Module, samples: list[SliceSample], device: torch.device, windows: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Dice/IoU/false-positive rate on slices with masks, P/R/F1 on slices with class labels.

    ``windows``: the checkpoint config of a native-resolution model, whose slices are predicted by
    sliding window and called tumour when their mask is non-empty at the fitted ``threshold``.
    """
    model.eval()
    if windows is not None:
        return window_metrics(model, samples, device, windows)
    probabilities, scores = predict_samples(model, samples, device)
    labelled = [i for i, s in enumerate(samples) if s.class_label is not None]
    labels = np.array([samples[i].class_label for i in labelled])
    cls_threshold = f1_best_threshold(scores[labelled], labels) if labelled else 0.5
    metrics = sample_metrics(samples, probabilities, scores, seg_threshold=0.5, cls_threshold=cls_threshold)
    if labelled:
        metrics["cls_logit_offset"] = logit_offset(cls_threshold)
    return metrics


def sample_metrics(samples: list[SliceSample], probabilities: list[np.ndarray] | None, scores: np.ndarray,
                   seg_threshold: float, cls_threshold: float) -> dict[str, Any]:
    """Segmentation metrics over the samples with a mask (pixels above ``seg_threshold``),
    classification metrics over those with a class label (scores above ``cls_threshold``)."""
    metrics: dict[str, Any] = {}
    seg_index = [i for i, s in enumerate(samples) if s.mask is not None]
    if probabilities is not None and seg_index:
        per_slice = per_slice_segmentation([probabilities[i] for i in seg_index], [samples[i].mask for i in seg_index],
                                           seg_threshold)
        metrics.update(summarize_segmentation(per_slice))
    cls_index = [i for i, s in enumerate(samples) if s.class_label is not None]
    if cls_index:
        labels = np.array([samples[i].class_label for i in cls_index])
        metrics.update(classification_metrics(scores[cls_index], labels, cls_threshold))
    return metrics


def validation_subset(samples: list[SliceSample], limit: int | None, seed: int) -> list[SliceSample]:
    """At most `limit` samples (seeded, in their original order): every whole tumour-free slice, the
    rest drawn per kind (with a mask / class only, by class) in proportion to the kind's share.
    Validation by sliding window costs a second a whole slice on a CPU, so a long list is sampled
    rather than cut; the tumour-free slices are few, and each false alarm among them is what the
    specificity term of `validation_score` counts, so none is left out."""
    if limit is None or len(samples) <= limit:
        return samples
    if limit < 1:
        raise ValueError(f"val_slices must be at least 1, got {limit}")
    keep = [i for i, sample in enumerate(samples) if is_whole_tumour_free(sample)][:limit]
    kept = set(keep)
    rest = [i for i in range(len(samples)) if i not in kept]
    kinds: dict[tuple[bool, Any], list[int]] = {}
    for index in rest:
        kinds.setdefault((samples[index].mask is not None, samples[index].class_label), []).append(index)
    rng, budget = np.random.default_rng(seed), limit - len(keep)
    for indices in kinds.values():
        share = max(1, round(budget * len(indices) / len(rest))) if budget > 0 else 0
        keep += rng.choice(indices, size=min(share, len(indices)), replace=False).tolist()
    return [samples[i] for i in sorted(keep)]


def logit_offset(threshold: float, limit: float = 8.0) -> float:
    """The logit of `threshold` (clipped to +-limit): subtracting it from the cls logit moves that
    threshold to probability 0.5, the decision point of every consumer of a checkpoint."""
    threshold = min(max(threshold, 1e-6), 1 - 1e-6)
    return float(np.clip(math.log(threshold / (1 - threshold)), -limit, limit))


def validation_score(metrics: dict[str, Any]) -> float:
    """Harmonic mean of the validation Dice, slice F1 and specificity (those measured): a model with
    Dice 0 scores 0 however well it classifies, so it can never be kept as the best checkpoint, and
    one that calls the tumour-free slices tumour loses however high its recall (F1 over mostly tumour
    slices barely sees false alarms)."""
    values = [metrics[key] for key in ("dice", "f1", "specificity") if metrics.get(key) is not None]
    if not values:
        return float("-inf")
    return 0.0 if min(values) <= 0 else float(len(values) / sum(1.0 / v for v in values))
