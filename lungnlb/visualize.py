"""Pictures for people: a CT slice with mask contours, written as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PREDICTION_COLOUR = "#ff3b30"
REFERENCE_COLOUR = "#34c759"


def display_range(image: np.ndarray) -> tuple[float, float]:
    """Grey-level range for showing any single-channel intensity: its 1st to 99th percentile."""
    low, high = np.percentile(image, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def draw_slice(axis, image: np.ndarray, prediction: np.ndarray | None = None,
               reference: np.ndarray | None = None, title: str = "") -> None:
    """Draw one (H, W) slice on `axis` with the prediction (red) and reference (green) contours."""
    low, high = display_range(image)
    axis.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    for mask, colour in ((reference, REFERENCE_COLOUR), (prediction, PREDICTION_COLOUR)):
        if mask is not None and mask.any():
            axis.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def save_overlay(path: Path, image: np.ndarray, prediction: np.ndarray | None = None,
                 reference: np.ndarray | None = None, title: str = "") -> Path:
    """Write one slice with its contours to `path` (PNG); the legend names what each colour is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 6.3), dpi=120)
    draw_slice(axis, image, prediction, reference, title)
    handles = [plt.Line2D([], [], color=PREDICTION_COLOUR, label="model")]
    if reference is not None:
        handles.append(plt.Line2D([], [], color=REFERENCE_COLOUR, label="reference label"))
    axis.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
