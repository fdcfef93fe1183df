"""Attention heat maps of the non-local blocks: which grid cells the block attends to.

For each block with attention a (n*n, n*n) (row i: how query cell i spreads its attention over the
key cells j), the map is the attention each cell *receives*, the column mean

    r_j = (1 / n^2) * sum_i a_ij,

reshaped to the n x n grid (row-major), divided by its maximum (so the most attended cell is 1;
r > 0 always, as a softmax is positive) and upsampled bilinearly to the input size. The column
mean is chosen over the row of the cell with the strongest tumour response because it needs no
segmentation output and summarises all queries; it answers "where does the block look".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import NonLocalBlock2d


def attention_maps(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """One (H, W) float32 map in [0, 1] per non-local block of `model` for input x (1, C, H, W).

    Keys are the block names the model reports (e.g. "level2"); models without non-local blocks
    (or that do not report attention) give an empty dict.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"attention_maps expects one image of shape (1, C, H, W), got {tuple(x.shape)}")
    if not _reports_attention(model):
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            attention = model(x, return_attention=True)["attention"]
    finally:
        model.train(was_training)
    return {name: _received_attention_map(weights[0], x.shape[-2:]) for name, weights in attention.items()}


def _reports_attention(model: nn.Module) -> bool:
    return any(isinstance(module, NonLocalBlock2d) for module in model.modules())


def _received_attention_map(attention: torch.Tensor, size: torch.Size) -> np.ndarray:
    """(n*n, n*n) attention -> (H, W) column-mean map scaled to max 1, bilinear upsampling."""
    grid = int(round(attention.shape[-1] ** 0.5))
    received = attention.float().mean(dim=0).reshape(1, 1, grid, grid)
    received = received / received.max().clamp(min=torch.finfo(torch.float32).tiny)
    upsampled = F.interpolate(received, size=tuple(size), mode="bilinear", align_corners=False)
    return upsampled[0, 0].clamp(0.0, 1.0).numpy().astype(np.float32)
