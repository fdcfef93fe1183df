"""Evaluation: metric definitions (hand-computed cases), the tumour-free slice policy, bootstrap intervals,
and `lungnlb evaluate` end to end on a few real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lungnlb.checkpoint import save_checkpoint
from lungnlb.cli import main
from lungnlb.evaluation.metrics import (
    average_precision,
    bootstrap_ci,
    classification_metrics,
    f1_best_threshold,
    per_slice_segmentation,
    summarize_segmentation,
)
from lungnlb.networks import build_model
from lungnlb.overlap import dice_iou
from train_helpers import DATA, TINY_KWARGS


def test_dice_iou_by_hand():
    prediction = np.zeros((4, 4), bool)
    target = np.zeros((4, 4), bool)
    prediction[0, :4] = True
    target[0, 2:] = True
    target[1, 2:] = True
    # |P| = 4, |G| = 4, |P n G| = 2: Dice = 4/8, IoU = 2/6
    assert dice_iou(prediction, target) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(np.zeros((2, 2)), np.zeros((2, 2))) == (1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        dice_iou(np.zeros((2, 2)), np.zeros((3, 3)))


def test_tumour_free_slices_count_only_as_false_positives():
    tumour = np.zeros((8, 8), bool)
    tumour[2:4, 2:4] = True
    empty = np.zeros((8, 8), bool)
    spurious = np.zeros((8, 8))
    spurious[0, 0] = 0.9
    per_slice = per_slice_segmentation([tumour * 0.9, spurious, np.zeros((8, 8))], [tumour, empty, empty])
    summary = summarize_segmentation(per_slice)
    assert summary["dice"] == pytest.approx(1.0) and summary["n_tumour_slices"] == 1
    assert summary["false_positive_rate"] == pytest.approx(0.5) and summary["n_tumour_free_slices"] == 2


def test_classification_metrics_by_hand():
    metrics = classification_metrics(np.array([0.9, 0.8, 0.3, 0.6]), np.array([1, 0, 1, 0]))
    # predicted positive: 0.9 (tp), 0.8 (fp), 0.6 (fp); missed 0.3 (fn)
    assert metrics["precision"] == pytest.approx(1 / 3)
    assert metrics["recall"] == pytest.approx(0.5)
    assert metrics["f1"] == pytest.approx(0.4)
    # ranking 1, 0, 1: AP = 0.5 * 1 + 0.5 * 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(5 / 6)


def test_f1_best_threshold_by_hand():
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2]), np.array([1, 1, 0, 1, 0, 0])
    # cut after 0.6: tp 3, fp 1, fn 0 -> F1 6/7, better than after 0.8 (F1 0.8) or 0.9 (F1 0.5)
    threshold = f1_best_threshold(scores, labels)
    assert threshold == pytest.approx(0.45)
    assert classification_metrics(scores, labels, threshold)["f1"] == pytest.approx(6 / 7)
    # tied scores cannot be split: the cut goes below the whole tie
    assert f1_best_threshold(np.array([0.7, 0.7, 0.2]), np.array([1, 0, 0])) == pytest.approx(0.45)
    assert f1_best_threshold(np.array([0.4, 0.1]), np.array([0, 0])) == 0.5


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).normal(0.7, 0.1, 200)
    low, high = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), 500)
    assert low < values.mean() < high and high - low < 0.1
    assert bootstrap_ci(lambda idx: 1.0, 5) == (1.0, 1.0)
    assert bootstrap_ci(lambda idx: 1.0, 0) is None


@pytest.mark.slow
def test_evaluate_command_on_real_files(tmp_path):
    npz = sorted((DATA / "lidc-idri" / "slices").glob("*.npz"))[-1]
    src = tmp_path / "src"
    (src / "lidc").mkdir(parents=True)
    (src / "lidc" / npz.name).symlink_to(npz)
    for class_name in ("normal", "malignant"):
        (src / "iq" / class_name).mkdir(parents=True)
        for jpeg in sorted((DATA / "iq-othnccd" / class_name).glob("*.jpg"))[:2]:
            (src / "iq" / class_name / jpeg.name).symlink_to(jpeg)
    with np.load(npz) as data:
        tumour_slices = int(np.sum(data["masks"].reshape(len(data["masks"]), -1).any(axis=1)))
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny", build_model("unet_sl_nlb", **TINY_KWARGS),
                                 {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}, "input_size": [64, 64]})
    out = tmp_path / "report.json"
    code = main(["evaluate", "--data", str(src), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--bootstrap", "50", "--cache", str(tmp_path / "studies"), "--figures"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n_tumour_slices"] == tumour_slices
    assert report["n_classified_slices"] == report["n_slices"] == tumour_slices + 4
    assert report["n_patients"] == 1 + 2  # the npz patient and one IQ-OTH/NCCD case block per class
    assert report["excluded_patients"]["count"] == 0  # a checkpoint with no training data recorded
    for key in ("dice", "iou", "precision", "recall", "f1", "specificity"):
        assert 0.0 <= report[key] <= 1.0
        low, high = report["ci"][key]
        assert low <= report[key] + 1e-9 and report[key] <= high + 1e-9
    assert set(report["by_source"]) == {"lidc-idri", "iq-othnccd"}
    assert {row["patient"] for row in report["by_patient"]} >= {npz.stem}
    assert report["date"] and report["commit"]
    assert out.with_suffix(".md").read_text().startswith("# LungNLB evaluation")
    figures = [p for p in report["figures"]]
    assert any(p.endswith("pr_curve.png") for p in figures) and any("worst_" in p for p in figures)
    assert all(Path(p).is_file() for p in figures)
