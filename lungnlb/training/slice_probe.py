"""Fit a checkpoint's slice probe (`lungnlb.slice_probe`) on its training and validation patients.

The training engine's last step (`lungnlb.training.trainer.train`, after the best checkpoint is
selected), when the split has single-slice images of the probe's intensity kind with both class
labels among both the training and the validation patients, and at least `MIN_VALIDATION_NORMALS`
validation normals (the IQ-OTH/NCCD JPEGs):

1. features ``f`` of each such slice by the selected checkpoint (its encoder stays frozen);
2. a logistic regression (scikit-learn, standardised features) on the training slices for each
   inverse regularisation ``C`` in `C_GRID`;
3. on the validation slices only: the (``C``, threshold) with the best F1 among those calling at
   most `MAX_NORMALS_CALLED` of the validation normals tumour (the target's 10 %); ties keep the
   smaller ``C``;
4. the probe written into the checkpoint's config (``slice_probe``), the weights unchanged.

A checkpoint trained further (the app's fine-tune, `lungnlb train --init`) starts without it: its
encoder is no longer the one the probe was fitted on.
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
MIN_VALIDATION_NORMALS = 10  # so that the 10 % allows one: fewer cannot choose a threshold


def probe_records(records: list[dict[str, Any]], cases: list[str], intensity: str = PROBE_INTENSITY
                  ) -> list[dict[str, Any]]:
    """The class-labelled records of ``intensity`` among ``cases``."""
    wanted = set(cases)
    return [r for r in records if r["case"] in wanted and r.get("intensity") == intensity
            and r.get("class_label") in (0, 1)]


def both_classes(records: list[dict[str, Any]]) -> bool:
    return {r["class_label"] for r in records} == {0, 1}


def probe_subsets(records: list[dict[str, Any]], split: dict[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
    """{"train", "val": the records a probe fits on}, or None when the split lacks what the module
    docstring asks for (both classes in both subsets, `MIN_VALIDATION_NORMALS` validation normals)."""
    chosen = {subset: probe_records(records, split["cases"][subset]) for subset in ("train", "val")}
    normals = sum(r["class_label"] == 0 for r in chosen["val"])
    if not all(both_classes(subset) for subset in chosen.values()) or normals < MIN_VALIDATION_NORMALS:
        return None
    return chosen


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


def fit_slice_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                    intensity: str = PROBE_INTENSITY) -> SliceProbe:
    """Steps 2-3 of the module docstring on (features, labels) of the training and validation slices."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    allowed = math.floor(MAX_NORMALS_CALLED * int((~val[1]).sum()))
    best = None
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(*train)
        probability = model.predict_proba(val[0])[:, 1]
        for threshold in np.unique(probability):
            row = operating_point(probability, val[1], threshold)
            if row["normals_called_tumour"] <= allowed and (best is None or row["f1"] > best[2]["f1"]):
                best = (c, model, row)
    if best is None:  # e.g. under 10 validation normals (none may be called) and a normal scoring highest
        raise ValueError(f"no slice probe calls at most {allowed} of the {int((~val[1]).sum())} validation "
                         "normals tumour")
    c, model, row = best
    scaler, regression = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    return SliceProbe(intensity, scaler.mean_, scaler.scale_, regression.coef_[0], float(regression.intercept_[0]),
                      row["threshold"], {"C": c, "train_slices": len(train[1]), "validation": row})


def add_slice_probe(checkpoint: Path, studies: Path, records: list[dict[str, Any]], split: dict[str, Any],
                    progress: Callable[[int, int], None] | None = None) -> SliceProbe | None:
    """Fit the probe of ``checkpoint`` on the ``split`` of ``studies`` and write it into its config
    (steps 1-4 of the module docstring); None, and the checkpoint untouched, when the split lacks
    the slices the module docstring asks for."""
    from lungnlb.checkpoint import load_model, save_checkpoint
    from lungnlb.inference import Predictor

    chosen = probe_subsets(records, split)
    if chosen is None:
        return None
    model, config = load_model(checkpoint)
    predictor = Predictor(model, config)
    train, val = (subset_features(predictor, Path(studies), chosen[subset], progress) for subset in ("train", "val"))
    probe = fit_slice_probe(train, val)
    save_checkpoint(checkpoint, model, {**config, "slice_probe": probe.as_config()})
    return probe
