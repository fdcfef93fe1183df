"""Fit a checkpoint's slice probe (`lungnlb.slice_probe`) on its training and validation patients.

The training engine's last step (`lungnlb.training.trainer.train`, after the best checkpoint is
selected), when the training and validation cases together have single-slice images of the probe's
intensity kind (the IQ-OTH/NCCD JPEGs) with both class labels, each in at least two cases, and at
least `MIN_NORMALS` normals:

1. features ``f`` of each such slice by the selected checkpoint (its encoder stays frozen);
2. for each inverse regularisation ``C`` in `C_GRID`, a logistic regression (scikit-learn,
   standardised features) per fold of `FOLDS` folds grouped by case (``StratifiedGroupKFold``: a
   case's slices are never on both sides), giving every slice an out-of-fold probability;
3. the (``C``, threshold) with the best pooled out-of-fold F1 among those calling at most
   `MAX_NORMALS_CALLED` of the pooled normals tumour (the target's 10 %); ties keep the smaller ``C``;
4. the regression refitted on every slice with that ``C``, at that threshold, written into the
   checkpoint's config (``slice_probe``), the weights unchanged.

Pooling the folds places the threshold on every normal of the training and validation cases, not on
the few of the validation cases alone (`experiments/results/probe_grouped_cv/`). A checkpoint trained
further (the app's fine-tune, `lungnlb train --init`) starts without a probe: its encoder is no
longer the one the probe was fitted on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lungnlb.data.studies import image_path, read_study_image
from lungnlb.evaluation.metrics import classification_metrics
from lungnlb.slice_probe import SliceProbe

PROBE_INTENSITY = "windowed8bit"
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
MAX_NORMALS_CALLED = 0.10
MIN_NORMALS = 10  # so that the 10 % allows one: fewer cannot choose a threshold
FOLDS = 5


def probe_records(records: list[dict[str, Any]], cases: list[str], intensity: str = PROBE_INTENSITY
                  ) -> list[dict[str, Any]]:
    """The class-labelled records of ``intensity`` among ``cases``."""
    wanted = set(cases)
    return [r for r in records if r["case"] in wanted and r.get("intensity") == intensity
            and r.get("class_label") in (0, 1)]


def both_classes(records: list[dict[str, Any]]) -> bool:
    return {r["class_label"] for r in records} == {0, 1}


def probe_pool(records: list[dict[str, Any]], split: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The records of the training and validation cases a probe fits on, or None when they lack what
    the module docstring asks for (both classes, each in two cases or more; `MIN_NORMALS` normals)."""
    pool = probe_records(records, [*split["cases"]["train"], *split["cases"]["val"]])
    cases = [{r["case"] for r in pool if r["class_label"] == label} for label in (0, 1)]
    normals = sum(r["class_label"] == 0 for r in pool)
    return pool if min(len(c) for c in cases) >= 2 and normals >= MIN_NORMALS else None


def subset_features(predictor, studies: Path, records: list[dict[str, Any]],
                    progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 2C), labels (N,) bool) of single-slice ``records`` by ``predictor``."""
    features, labels = [], []
    for number, record in enumerate(records, start=1):
        image = read_study_image(image_path(studies, record["image_id"]))
        if math.prod(image.array.shape) != math.prod(image.array.shape[-2:]):
            raise ValueError(f"{record['image_id']}: the slice probe scores single slices, got {image.array.shape}")
        plane = np.asarray(image.array, dtype=np.float32).reshape(image.array.shape[-2:])
        features.append(predictor.slice_probe_features(predictor.model_input(plane, image.intensity)))
        labels.append(bool(record["class_label"]))
        if progress is not None:
            progress(number, len(records))
    return np.stack(features), np.array(labels, dtype=bool)


def operating_point(probability: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """F1, recall and normals called tumour when ``probability >= threshold`` calls tumour."""
    called = (probability >= threshold).astype(float)
    metrics = classification_metrics(called, labels)
    return {"threshold": float(threshold), "f1": round(metrics["f1"], 4), "recall": round(metrics["recall"], 4),
            "normals_called_tumour": int(called[~labels].sum()), "normal_slices": int((~labels).sum()),
            "tumour_slices": int(labels.sum())}


def grouped_folds(labels: np.ndarray, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fitting, held-out) indices of `FOLDS` folds (fewer when there are fewer groups), stratified by
    label and grouped by ``groups``; each fitting side holds both labels."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = list(StratifiedGroupKFold(n_splits=min(FOLDS, len(set(groups)))).split(labels, labels, groups))
    if any(len(set(labels[fitting])) < 2 for fitting, _ in folds):
        raise ValueError("a fold of the slice probe's cross-validation lacks one class: too few cases of it")
    return folds


def _regression(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def out_of_fold_probability(features: np.ndarray, labels: np.ndarray, folds, c: float) -> np.ndarray:
    """Each slice's probability by the regression (inverse regularisation ``c``) fitted without its fold."""
    probability = np.empty(len(labels))
    for fitting, held_out in folds:
        probability[held_out] = _regression(c).fit(features[fitting], labels[fitting]).predict_proba(
            features[held_out])[:, 1]
    return probability


def fit_slice_probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                    intensity: str = PROBE_INTENSITY) -> SliceProbe:
    """Steps 2-4 of the module docstring on (N, F) ``features``, (N,) bool ``labels`` and (N,) ``groups``
    (the slices' cases)."""
    folds = grouped_folds(labels, np.asarray(groups))
    allowed = math.floor(MAX_NORMALS_CALLED * int((~labels).sum()))
    best = None
    for c in C_GRID:
        probability = out_of_fold_probability(features, labels, folds, c)
        for threshold in np.unique(probability):
            row = operating_point(probability, labels, threshold)
            if row["normals_called_tumour"] <= allowed and (best is None or row["f1"] > best[1]["f1"]):
                best = (c, row)
    if best is None:  # under 10 normals (none may be called) and a normal scoring highest out of fold
        raise ValueError(f"no slice probe calls at most {allowed} of the {int((~labels).sum())} normals tumour "
                         "out of fold")
    c, row = best
    model = _regression(c).fit(features, labels)
    scaler, regression = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    fit = {"C": c, "slices": len(labels), "cases": len(set(groups)), "folds": len(folds), "out_of_fold": row}
    return SliceProbe(intensity, scaler.mean_, scaler.scale_, regression.coef_[0], float(regression.intercept_[0]),
                      row["threshold"], fit)


def add_slice_probe(checkpoint: Path, studies: Path, records: list[dict[str, Any]], split: dict[str, Any],
                    progress: Callable[[int, int], None] | None = None) -> SliceProbe | None:
    """Fit the probe of ``checkpoint`` on the ``split`` of ``studies`` and write it into its config
    (steps 1-4 of the module docstring); None, and the checkpoint untouched, when the split lacks
    the slices the module docstring asks for."""
    from lungnlb.checkpoint import load_model, save_checkpoint
    from lungnlb.inference import Predictor

    pool = probe_pool(records, split)
    if pool is None:
        return None
    model, config = load_model(checkpoint)
    features, labels = subset_features(Predictor(model, config), Path(studies), pool, progress)
    probe = fit_slice_probe(features, labels, np.array([r["case"] for r in pool]))
    save_checkpoint(checkpoint, model, {**config, "slice_probe": probe.as_config()})
    return probe
