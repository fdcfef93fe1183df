"""Symmetry gate theta_i of the symmetric non-local block (paper §III.D).

For cell i (ph x pw pixels, all C channels) of the block's input x, theta_i is the cosine
similarity between its top half, rows [0, ph // 2), and its bottom half, rows
[ph - ph // 2, ph) (the middle row is left out when ph is odd); the halves are compared row for
row, top row with the first row of the bottom half (a translation, not a mirror image):

    theta_i = <top_i, bottom_i> / (||top_i|| * ||bottom_i||),   theta_i = 0 if either half is all zero.

The paper divides the halves' dot product by its own absolute value, which reduces theta to a
sign; the cosine similarity is the non-degenerate reading. Computed in float32 from the 2 x 2 Gram
matrix of the two halves (one batched matrix product). Where a square overflows to inf or
underflows (a squared norm below 1e-30, including halves that are exactly zero), the Gram matrix is
recomputed after scaling each sample to max |x| = 1, so theta is never NaN; the first product
alone serves ordinary activations without an extra pass over the map. Under `torch.jit.trace`
the scaled path is always taken, so a traced model keeps the guarantee.
"""

from __future__ import annotations

import torch

from .pointwise import is_channels_last
from .tokenize import check_grid_divides


def symmetry_gate(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n*n) float32 cosine similarity of each cell's top and bottom halves."""
    batch = x.shape[0]
    tiny = torch.finfo(torch.float32).tiny
    with torch.autocast(device_type=x.device.type, enabled=False):
        halves = cell_halves(x, grid)
        gram = torch.bmm(halves, halves.transpose(1, 2))  # [[|t|^2, t.b], [t.b, |b|^2]] per cell
        if torch.jit.is_tracing() or not well_scaled(gram):
            flat = halves.reshape(batch, -1)
            peak = torch.linalg.vector_norm(flat, ord=float("inf"), dim=1, keepdim=True)
            halves = (flat / peak.clamp(min=tiny)).reshape(halves.shape)
            gram = torch.bmm(halves, halves.transpose(1, 2))
    norms = (gram[:, 0, 0] * gram[:, 1, 1]).sqrt()
    theta = torch.where(norms > 0, gram[:, 0, 1] / norms.clamp(min=tiny), 0.0)
    return theta.clamp(-1.0, 1.0).reshape(batch, grid * grid)


def well_scaled(gram: torch.Tensor) -> bool:
    """True if every squared half-norm on the Gram diagonals is finite and at least 1e-30."""
    squares = torch.diagonal(gram, dim1=1, dim2=2)
    return bool(((squares >= 1e-30) & (squares < float("inf"))).all())


def cell_halves(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*n*n, 2, C * (ph//2) * pw) float32: each cell's top and bottom half rows.

    A half is flattened over (C, rows, pw) for NCHW input and over (rows, pw, C) for channels_last
    input (the order in memory); the cosine does not depend on the order, only on both halves
    using the same one.
    """
    batch, channels, height, width = x.shape
    check_grid_divides(height, width, grid)
    ph, pw = height // grid, width // grid
    if ph < 2:
        raise ValueError(f"cells of height {ph} have no top and bottom half: need H / grid >= 2, got H={height}, grid={grid}")
    half = ph // 2
    cells = x.float().reshape(batch, channels, grid, ph, grid, pw)
    if is_channels_last(x):
        cells = cells.permute(0, 2, 4, 3, 5, 1)  # (B, n, n, ph, pw, C)
    else:
        cells = cells.permute(0, 2, 4, 1, 3, 5).transpose(3, 4)  # (B, n, n, ph, C, pw)
    top, bottom = cells[:, :, :, :half], cells[:, :, :, ph - half :]
    return torch.stack([top, bottom], dim=3).reshape(batch * grid * grid, 2, channels * half * pw)
