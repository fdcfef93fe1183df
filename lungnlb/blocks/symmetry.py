"""Symmetry gate theta_i of the symmetric non-local block (paper §III.D).

For cell i (p_h x p_w pixels, all C channels) of the block's input x, theta_i is the cosine
similarity between its top half, rows [0, p_h // 2), and its bottom half, rows
[p_h - p_h // 2, p_h) (the middle row is left out when p_h is odd):

    theta_i = <top_i, bottom_i> / (||top_i|| * ||bottom_i||),   theta_i = 0 if either half is all zero.

The paper divides the halves' dot product by its own absolute value, which reduces theta to a
sign; the cosine similarity is the non-degenerate reading. Computed in float32, never NaN.
"""

from __future__ import annotations

import torch

from .tokenize import check_grid_divides


def symmetry_gate(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n*n) float32 cosine similarity of each cell's top and bottom halves."""
    batch, channels, height, width = x.shape
    check_grid_divides(height, width, grid)
    ph, pw = height // grid, width // grid
    if ph < 2:
        raise ValueError(f"cells of height {ph} have no top and bottom half: need H / grid >= 2, got H={height}, grid={grid}")
    half = ph // 2
    cells = x.float().reshape(batch, channels, grid, ph, grid, pw)
    top = cells[:, :, :, :half]
    bottom = cells[:, :, :, ph - half :]
    reduce_dims = (1, 3, 5)  # channels, rows inside the half, columns of the cell
    top, bottom = _unit_max(top, reduce_dims), _unit_max(bottom, reduce_dims)
    dot = (top * bottom).sum(dim=reduce_dims)
    norms = top.square().sum(dim=reduce_dims).sqrt() * bottom.square().sum(dim=reduce_dims).sqrt()
    theta = torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
    return theta.clamp(-1.0, 1.0).reshape(batch, grid * grid)


def _unit_max(half: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Scale each cell's half to max |value| = 1 (cosine is scale-free); avoids overflow of squares."""
    peak = half.abs().amax(dim=dims, keepdim=True)
    return half / peak.clamp(min=torch.finfo(torch.float32).tiny)
