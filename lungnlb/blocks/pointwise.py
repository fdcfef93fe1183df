"""1x1 convolution computed as one (batched) matrix product in the input's memory format.

Same parameters and result as `nn.Conv2d(in, out, kernel_size=1, bias=bias)`, for x (B, C, H, W):

    y[b, :, p] = weight @ x[b, :, p] + bias (+ add[b, :, p])        for every pixel p

oneDNN's 1x1 convolution kernel is many times slower than the equivalent matrix product for some
channel counts on CPU (`benchmarks/speed.py` measures the whole model). The
product runs on a view, never a copy: (B, C, H*W) for NCHW input (y = W x), (B, H*W, C) for
channels_last input (y^T = x^T W^T, output channels_last too). Bias and an optional residual
`add` are folded into the same call (torch.baddbmm).
"""

from __future__ import annotations

import torch
from torch import nn


def is_channels_last(x: torch.Tensor) -> bool:
    """True if x (B, C, H, W) is laid out NHWC and not also plainly contiguous (e.g. C = 1)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class PointwiseConv2d(nn.Conv2d):
    """`nn.Conv2d(in_channels, out_channels, kernel_size=1)` evaluated with torch.baddbmm."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W); `add` (B, C_out, H, W) is added to the result."""
        return pointwise_conv(x, self.weight.reshape(self.out_channels, self.in_channels), self.bias, add)


def pointwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, add: torch.Tensor | None = None
) -> torch.Tensor:
    """y[b, :, p] = weight @ x[b, :, p] + bias (+ add[b, :, p]); x (B, C_in, H, W), weight (C_out, C_in)."""
    if is_channels_last(x):
        return _pointwise_channels_last(x, weight, bias, add)
    batch, in_channels, height, width = x.shape
    out_channels, pixels = weight.shape[0], height * width
    expanded = weight.reshape(1, out_channels, in_channels).expand(batch, -1, -1)
    flat = x.reshape(batch, in_channels, pixels)
    base = _base(add.reshape(batch, out_channels, pixels) if add is not None else None, bias, (1, -1, 1))
    if base is None:
        return torch.bmm(expanded, flat).reshape(batch, out_channels, height, width)
    return torch.baddbmm(base.expand(batch, -1, pixels), expanded, flat).reshape(batch, out_channels, height, width)


def _pointwise_channels_last(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add: torch.Tensor | None
) -> torch.Tensor:
    batch, in_channels, height, width = x.shape
    out_channels, pixels = weight.shape[0], height * width
    weight_t = weight.t().expand(batch, -1, -1)
    flat = x.permute(0, 2, 3, 1).reshape(batch, pixels, in_channels)  # a view for NHWC
    if add is not None:
        add = add.permute(0, 2, 3, 1).reshape(batch, pixels, out_channels)
    base = _base(add, bias, (1, 1, -1))
    if base is None:
        y = torch.bmm(flat, weight_t)
    else:
        y = torch.baddbmm(base.expand(batch, pixels, -1), flat, weight_t)
    return y.reshape(batch, height, width, out_channels).permute(0, 3, 1, 2)


def _base(add: torch.Tensor | None, bias: torch.Tensor | None, bias_shape: tuple[int, ...]) -> torch.Tensor | None:
    """add + bias (either may be absent), or None when both are."""
    bias = bias.reshape(bias_shape) if bias is not None else None
    if add is None:
        return bias
    return add + bias if bias is not None else add
