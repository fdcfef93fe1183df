"""Grid non-local block with the paper's localized and symmetric modifications (§III.B-E).

For x of shape (B, C, H, W) cut into an n x n grid (see `tokenize`), with 1x1 convolutions
f, g, h: C -> C' (queries, keys, values), v: C' -> C and W: C -> C applied per pixel:

    q_i, k_i, v_i = tokens of f(x), g(x), h(x)           each of dimension d_k = C' * ph * pw
                                                           (f, g, h computed as one 1x1 convolution C -> 3C')
    s_ij  = q_i . k_j / sqrt(d_k)                          (basic)
    s_ij  = D_ij * q_i . k_j / sqrt(d_k)                   (localized, D = locality_weights)
    a_ij  = softmax_j(s_ij)                                (float32)
    O_i   = v(sum_j a_ij v_j)                              (basic, localized)
    O_i   = v(theta_i * sum_j a_ij v_j)                    (symmetry; theta = symmetry_gate(x))
    Y     = W(O) + X

W is a bias-free 1x1 convolution (v carries the bias) that starts at zero, so the block is the
identity at initialisation (at inference, without autograd, W and v are applied as their product,
one C' -> C matrix, since no non-linearity lies between them); W receives gradient from the first
step and the projections from the step after (once W is non-zero). Logits that overflow float32
saturate at +-max (never NaN).

Memory format: the block keeps its input's layout. For NCHW input a token is flattened over
(C', ph, pw) (`grid_to_tokens`); for channels_last input over (ph, pw, C'), the order in which the
cell lies in memory, so tokenising is one contiguous gather and the 1x1 convolutions run on
views. The logits q_i . k_j and the sums sum_j a_ij v_j do not depend on the order in which a
token's entries are listed, so both layouts compute the same block (up to float rounding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .locality import DISTANCES, locality_weights
from .pointwise import PointwiseConv2d, is_channels_last, pointwise_conv
from .symmetry import symmetry_gate
from .tokenize import check_grid_divides, grid_to_tokens, tokens_to_grid

VARIANTS = ("basic", "localized", "symmetry", "symmetry_localized")


class NonLocalBlock2d(nn.Module):
    """Non-local attention between the n x n grid cells of a 2D feature map.

    Args:
        in_channels: C, channels of the input and output.
        grid: n, the map is cut into n x n cells (H and W must be divisible by n).
        variant: "basic", "localized" (logits scaled by D_ij), "symmetry" (output gated by theta_i)
            or "symmetry_localized" (both).
        inner_channels: C', channels of queries, keys and values; default max(C // 4, 1).
        distance: "paper" or "chebyshev", the dist(i, j) of the localized variants.
    """

    def __init__(
        self,
        in_channels: int,
        grid: int = 8,
        variant: str = "basic",
        inner_channels: int | None = None,
        distance: str = "paper",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        inner = inner_channels if inner_channels is not None else max(in_channels // 4, 1)
        self.in_channels, self.inner_channels, self.grid = in_channels, inner, grid
        self.variant, self.distance = variant, distance
        self.localized = variant in ("localized", "symmetry_localized")
        self.symmetric = variant in ("symmetry", "symmetry_localized")
        # f, g, h as one 1x1 convolution: output channels [0, C') are queries, [C', 2C') keys, [2C', 3C') values
        self.fast_inference = False  # set by lungnlb.networks.inference_form
        self.qkv = PointwiseConv2d(in_channels, 3 * inner)
        self.out = PointwiseConv2d(inner, in_channels)
        self.residual = PointwiseConv2d(in_channels, in_channels, bias=False)
        nn.init.zeros_(self.residual.weight)
        locality = locality_weights(grid, distance) if self.localized else torch.ones(0)
        self.register_buffer("locality", locality, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, inner_channels={self.inner_channels}, grid={self.grid}, "
            f"variant={self.variant!r}, distance={self.distance!r}"
        )

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (B, C, H, W); with return_attention also the (B, n*n, n*n) attention."""
        batch, channels, height, width = x.shape
        check_grid_divides(height, width, self.grid)
        fused = self.qkv(x)
        channels_last = is_channels_last(fused)
        queries, keys, values = self._tokens_channels_last(fused) if channels_last else self._tokens(fused)
        attended, attention = self._attend(queries, keys, values)
        if self.symmetric:
            attended = attended * symmetry_gate(x, self.grid).unsqueeze(-1)
        if channels_last:
            mixed = self._grid_channels_last(attended, height, width)
        else:
            mixed = tokens_to_grid(attended, self.grid, self.inner_channels, height, width)
        y = self._project(mixed.to(x.dtype), x)
        return (y, attention) if return_attention else y

    def _project(self, mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Y = W(v(O)) + X. In the inference form W v is one C' -> C product: (W W_v) O + W b_v + X."""
        if not self.fast_inference:
            return self.residual(self.out(mixed), add=x)
        residual = self.residual.weight.flatten(1)
        weight = residual @ self.out.weight.flatten(1)
        bias = residual @ self.out.bias
        return pointwise_conv(mixed, weight.to(mixed.dtype), bias.to(mixed.dtype), add=x)

    def _tokens(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """NCHW (B, 3C', H, W) -> q, k, v tokens (B, n*n, C'*ph*pw), flattened over (C', ph, pw)."""
        # a token of the fused map is (3C', ph, pw) flattened, so q, k, v are consecutive thirds of it
        return grid_to_tokens(fused, self.grid).chunk(3, dim=-1)

    def _tokens_channels_last(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """NHWC (B, 3C', H, W) -> q, k, v tokens (B, n*n, ph*pw*C'), flattened over (ph, pw, C')."""
        batch, _, height, width = fused.shape
        n, inner = self.grid, self.inner_channels
        cells = fused.permute(0, 2, 3, 1).reshape(batch, n, height // n, n, width // n, 3, inner)
        return cells.permute(5, 0, 1, 3, 2, 4, 6).reshape(3, batch, n * n, -1).unbind(0)

    def _grid_channels_last(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, n*n, ph*pw*C') -> NHWC (B, C', H, W); the inverse of `_tokens_channels_last` for one map."""
        batch, n, inner = tokens.shape[0], self.grid, self.inner_channels
        cells = tokens.reshape(batch, n, n, height // n, width // n, inner).permute(0, 1, 3, 2, 4, 5)
        return cells.reshape(batch, height, width, inner).permute(0, 3, 1, 2)

    def _attend(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens sum_j a_ij v_j (B, n*n, d_k) and the attention a (B, n*n, n*n), both float32."""
        with torch.autocast(device_type=queries.device.type, enabled=False):
            logits = torch.bmm(queries.float(), keys.float().transpose(1, 2))
            logits = logits * (1.0 / math.sqrt(queries.shape[-1]))
            if self.localized:
                logits = logits * self.locality
            limit = torch.finfo(torch.float32).max  # overflowing logits saturate instead of giving NaN
            logits = torch.nan_to_num(logits, nan=0.0, posinf=limit, neginf=-limit)
            attention = torch.softmax(logits, dim=-1)
            attended = torch.bmm(attention, values.float())
        return attended, attention
