"""Grid tokenisation: cut a feature map into an n x n grid of cells, one token per cell.

For x of shape (B, C, H, W) and a grid of n x n cells of size (ph, pw) = (H / n, W / n), token
i = row * n + col is the cell's features flattened over (C, ph, pw), so the token dimension is
C * ph * pw. `grid_to_tokens` and `tokens_to_grid` are exact inverses.
"""

from __future__ import annotations

import torch


def check_grid_divides(height: int, width: int, grid: int) -> None:
    """Raise ValueError unless an n x n grid cuts a (height, width) map into equal cells."""
    if grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid}")
    if height % grid or width % grid:
        raise ValueError(
            f"feature map of size {height}x{width} cannot be cut into a {grid}x{grid} grid: "
            f"height and width must be divisible by {grid}"
        )


def grid_to_tokens(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n*n, C*ph*pw), cells in row-major order (index = row * n + col)."""
    batch, channels, height, width = x.shape
    check_grid_divides(height, width, grid)
    ph, pw = height // grid, width // grid
    cells = x.reshape(batch, channels, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(batch, grid * grid, channels * ph * pw)


def tokens_to_grid(tokens: torch.Tensor, grid: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(B, n*n, C*ph*pw) -> (B, C, H, W); the inverse of `grid_to_tokens`."""
    batch = tokens.shape[0]
    ph, pw = height // grid, width // grid
    cells = tokens.reshape(batch, grid, grid, channels, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return cells.reshape(batch, channels, height, width)
