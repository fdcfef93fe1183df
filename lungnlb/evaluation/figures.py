"""Figures of an evaluation: precision-recall curve, worst segmentation cases, attention overlays (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lungnlb.evaluation.evaluate import SliceResult  # noqa: E402
from lungnlb.evaluation.metrics import dice_iou, precision_recall_curve  # noqa: E402
from lungnlb.inference import resize_batch  # noqa: E402


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)
    tmp.replace(path)
    return path


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
              if r.mask is not None and r.probability is not None and r.mask.any()]
    paths = []
    for rank, (dice, result) in enumerate(sorted(scored, key=lambda item: item[0])[:count]):
        figure, axis = plt.subplots(figsize=(4, 4))
        axis.imshow(result.image, cmap="gray", vmin=0, vmax=1)
        axis.contour(result.mask, levels=[0.5], colors="lime", linewidths=1)
        if (result.probability > threshold).any():
            axis.contour(result.probability, levels=[threshold], colors="red", linewidths=1)
        axis.set_title(f"{result.image_id} z={result.z} Dice {dice:.2f}", fontsize=8)
        axis.axis("off")
        paths.append(_save(figure, folder / f"worst_{rank:02d}_{result.image_id}_z{result.z}.png"))
    return paths


def attention_overlay(model, image: np.ndarray, input_size: tuple[int, int], path: Path) -> Path | None:
    """The slice with each non-local block's attention map overlaid (one panel per block); None without NLBs."""
    from lungnlb.explain import attention_maps

    tensor = resize_batch(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None], input_size)
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
