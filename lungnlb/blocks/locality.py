"""Locality weights D_ij that scale the attention logits of the localized non-local block.

Paper (§III.C): logits are multiplied elementwise by D_ij = dist(i, j) with

    dist(i, j) = 1 / min(|col_i - col_j|, |row_i - row_j|)          ("paper")

which divides by zero whenever cells i and j share a row or a column (and for i = j). That is
resolved as D = 1: dist = 1 / max(min(|dc|, |dr|), 1). Because the min is taken, cells in the same
row or column get full weight however far apart they are; the alternative reading

    dist(i, j) = 1 / max(max(|dc|, |dr|), 1)                        ("chebyshev")

really decays with distance. Cells are indexed row-major: index = row * n + col.
"""

from __future__ import annotations

import torch

DISTANCES = ("paper", "chebyshev")


def locality_weights(grid: int, distance: str = "paper") -> torch.Tensor:
    """(n*n, n*n) float32 tensor D with D[i, j] = dist(cell i, cell j), values in (0, 1]."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid}")
    index = torch.arange(grid * grid)
    rows, cols = index // grid, index % grid
    row_gap = (rows[:, None] - rows[None, :]).abs()
    col_gap = (cols[:, None] - cols[None, :]).abs()
    combine = torch.minimum if distance == "paper" else torch.maximum
    gap = combine(row_gap, col_gap).clamp(min=1)
    return 1.0 / gap.to(torch.float32)
