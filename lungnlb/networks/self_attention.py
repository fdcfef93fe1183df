"""Standard multi-head self-attention over pixels, for the "U-Net with self attention" baseline.

For x of shape (B, C, H, W), every pixel is a token of dimension C (H*W tokens):

    Y = X + proj(MHSA(LayerNorm(X)))      with softmax(Q K^T / sqrt(C / heads)) V per head

`proj` starts at zero so the block is the identity at initialisation, like the non-local block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PixelSelfAttention2d(nn.Module):
    """Pre-norm multi-head self-attention between all pixels of a (B, C, H, W) map."""

    def __init__(self, channels: int, heads: int = 8) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        qkv = self.qkv(self.norm(tokens)).reshape(batch, height * width, 3, self.heads, channels // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, H*W, C / heads)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        return x + self.proj(attended).transpose(1, 2).reshape(batch, channels, height, width)
