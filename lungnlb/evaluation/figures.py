"""Figures of an evaluation (PNG): per-patient Dice, FROC and precision-recall curves, worst cases, attention."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lungnlb.io.atomic import atomic_write  # noqa: E402
from lungnlb.evaluation.metrics import precision_recall_curve  # noqa: E402
from lungnlb.evaluation.predict import SliceResult  # noqa: E402
from lungnlb.overlap import dice_iou  # noqa: E402
from lungnlb.inference import resize_batch  # noqa: E402


def _save(figure, path: Path) -> Path:
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=100, bbox_inches="tight"))
    plt.close(figure)
    return path


def patient_dice(report: dict, path: Path) -> Path | None:
    """Each patient's mean Dice, one column of dots per source, with the human reference where known."""
    rows = [row for row in report["by_patient"] if row["dice"] is not None]
    if not rows:
        return None
    sources = sorted({row["source"] for row in rows})
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(sources), 3.6))
    rng = np.random.default_rng(0)
    for index, source in enumerate(sources):
        values = np.array([row["dice"] for row in rows if row["source"] == source])
        axis.scatter(index + rng.uniform(-0.25, 0.25, len(values)), values, s=6, alpha=0.5)
        axis.hlines(np.mean(values), index - 0.35, index + 0.35, colors="black")
    human = (report.get("readers") or {}).get("human_reference", {}).get("mean_over_patients")
    if human is not None:
        axis.axhline(human, color="grey", linestyle="--", linewidth=1, label=f"readers vs each other {human:.2f}")
        axis.legend(fontsize=7, loc="lower right")
    axis.set(xticks=range(len(sources)), ylim=(-0.02, 1.02), ylabel="mean Dice per patient",
             title=f"{len(rows)} patients never trained on")
    axis.set_xticklabels(sources, fontsize=8)
    return _save(figure, path)


def froc_curve(report: dict, path: Path) -> Path | None:
    """Lesion sensitivity against false-positive components per whole slice."""
    froc = (report.get("tumour_free") or {}).get("froc")
    if not froc:
        return None
    figure, axis = plt.subplots(figsize=(4, 3.4))
    axis.plot(froc["false_positives_per_slice"], froc["sensitivity"], drawstyle="steps-post")
    axis.set(xscale="symlog", xlabel="false-positive components per slice", ylabel="lesion sensitivity",
             ylim=(0, 1.02), title=f"FROC, {froc['n_slices']} whole slices (score {froc['score']:.2f})")
    return _save(figure, path)


def pr_curve(results: list[SliceResult], path: Path) -> Path | None:
    """Precision against recall of the slice classifier over all thresholds; None without class labels."""
    labelled = [r for r in results if r.class_label is not None]
    if not labelled:
        return None
    precision, recall = precision_recall_curve(np.array([r.score for r in labelled]),
                                               np.array([r.class_label for r in labelled]))
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.step(recall, precision, where="post")
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="neoplasm present")
    return _save(figure, path)


def worst_cases(results: list[SliceResult], folder: Path, count: int = 6, threshold: float = 0.5) -> list[Path]:
    """The `count` tumour slices with the lowest Dice: reference contour green, prediction red."""
    scored = [(dice_iou(r.probability > threshold, r.mask)[0], r) for r in results
              if r.mask is not None and r.probability is not None and r.mask.any() and not r.crop]
    paths = []
    for rank, (dice, result) in enumerate(sorted(scored, key=lambda item: item[0])[:count]):
        figure, axis = plt.subplots(figsize=(4, 4))
        axis.imshow(np.asarray(result.image, np.float32), cmap="gray", vmin=0, vmax=1)
        axis.contour(result.mask, levels=[0.5], colors="lime", linewidths=1)
        if (result.probability > threshold).any():
            axis.contour(np.asarray(result.probability, np.float32), levels=[threshold], colors="red", linewidths=1)
        axis.set_title(f"{result.image_id} z={result.z} Dice {dice:.2f}", fontsize=8)
        axis.axis("off")
        paths.append(_save(figure, folder / f"worst_{rank:02d}_{result.image_id}_z{result.z}.png"))
    return paths


def attention_overlay(model, image: np.ndarray, input_size: tuple[int, int], path: Path) -> Path | None:
    """The slice with each non-local block's attention map overlaid (one panel per block); None without NLBs."""
    from lungnlb.explain import attention_maps

    tensor = resize_batch(torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None], input_size)
    device = next(model.parameters()).device
    maps = attention_maps(model, tensor.to(device))
    if not maps:
        return None
    shown = tensor[0, 0].numpy()
    figure, axes = plt.subplots(1, len(maps) + 1, figsize=(3 * (len(maps) + 1), 3))
    axes[0].imshow(shown, cmap="gray")
    axes[0].set_title("slice", fontsize=8)
    for axis, (name, heat) in zip(axes[1:], maps.items()):
        axis.imshow(shown, cmap="gray")
        axis.imshow(heat, cmap="jet", alpha=0.45)
        axis.set_title(name, fontsize=8)
    for axis in axes:
        axis.axis("off")
    return _save(figure, path)
