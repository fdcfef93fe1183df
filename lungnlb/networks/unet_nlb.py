"""2D U-Net (MONAI BasicUNet) with a classification head and optional non-local blocks.

The segmentation path is exactly MONAI's BasicUNet; the additions are

- non-local blocks (`lungnlb.blocks.NonLocalBlock2d`) applied to the encoder output of the chosen
  levels (level l has spatial size H / 2**l), so both the skip connection and the deeper encoder
  see the attended features (paper Fig. 1: blocks at intermediate scales);
- an optional `bottleneck` module applied to the deepest features (used by `unet_sa`);
- a classification head: global average pooling of the bottleneck features + linear -> 1 logit
  ("neoplasm present").

Speed, without changing parameters or state_dict keys: the decoder skips MONAI UpCat's replicate
padding (a copy that pads by zero pixels for the sizes accepted here) and the final 1x1
convolution is a matrix product (`PointwiseConv2d`). The faster inference form (instance norm on
the group-norm kernel, channels_last input, fused block projections) is an explicit conversion,
`lungnlb.networks.inference_form`, which sets `fast_inference`; training stays NCHW, where torch's
instance-norm backward is accurate (docs/method.md, speed section).

`forward(x)` returns {"seg": (B, 1, H, W) logits, "cls": (B, 1) logits}; with
`return_attention=True` also {"attention": {block name: (B, n*n, n*n)}}; with `return_features=True`
also {"features": (B, C4)}, the classification head's input (the slice probe's features,
`lungnlb.slice_probe`). With `deep_supervision`
(nnU-Net's auxiliary outputs), a model in training mode also returns {"seg_deep": [(B, 1, H/2, W/2),
(B, 1, H/4, W/4)] logits}, 1x1 convolutions of the decoder at those sizes; in eval mode (and in
the inference form) the output is the same as without.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet
from torch import nn

from ..blocks import NonLocalBlock2d
from ..blocks.pointwise import PointwiseConv2d

FEATURES = (32, 32, 64, 128, 256, 32)
DEPTH = 4  # BasicUNet halves the size four times


def unet_size_divisor(nlb_levels: Sequence[int] = (), grid: int = 8, symmetric: bool = False) -> int:
    """Smallest d such that H, W divisible by d fit the U-Net and every block's grid.

    A block at level l needs H / 2**l divisible by the grid; a symmetric block also needs cells at
    least two rows tall (a top and a bottom half), hence an even cell height.
    """
    divisor = 2**DEPTH
    for level in nlb_levels:
        divisor = math.lcm(divisor, 2**level * grid * (2 if symmetric else 1))
    return divisor


def check_input_size(x: torch.Tensor, divisor: int, name: str) -> None:
    """Raise ValueError naming the size and the divisor unless H and W are multiples of it."""
    height, width = x.shape[-2:]
    if height % divisor or width % divisor:
        raise ValueError(f"{name} needs height and width divisible by {divisor}, got {height}x{width}")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) with NHWC strides: a view when C == 1 (where `Tensor.contiguous` would keep
    NCHW strides, the two layouts holding the same bytes), else a copy unless already NHWC."""
    if x.shape[1] == 1:
        batch, _, height, width = x.shape
        return x.contiguous().as_strided(x.shape, (height * width, 1, width, 1))
    return x.contiguous(memory_format=torch.channels_last)


class SegClsUNet(nn.Module):
    """BasicUNet segmentation + bottleneck classification, with non-local blocks at `nlb_levels`.

    Args:
        in_channels: input channels (1 for CT).
        nlb_variant: None (plain U-Net) or a `NonLocalBlock2d` variant.
        nlb_levels: encoder levels (1..4) that get a block; level l has size H / 2**l.
        grid, inner_channels, distance: passed to every `NonLocalBlock2d`.
        bottleneck: module applied to the level-4 features, shape preserving (None: identity).
        features: BasicUNet's six feature sizes.
        deep_supervision: auxiliary seg logits at 1/2 and 1/4 of the input size in training mode.
    """

    def __init__(
        self,
        in_channels: int = 1,
        nlb_variant: str | None = None,
        nlb_levels: Sequence[int] = (2, 3),
        grid: int = 8,
        inner_channels: int | None = None,
        distance: str = "paper",
        bottleneck: nn.Module | None = None,
        features: Sequence[int] = FEATURES,
        name: str = "SegClsUNet",
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        levels = tuple(sorted(set(nlb_levels))) if nlb_variant is not None else ()
        if any(level not in range(1, DEPTH + 1) for level in levels):
            raise ValueError(f"nlb_levels must be within 1..{DEPTH}, got {tuple(nlb_levels)}")
        self.name = name
        self.fast_inference = False  # set by lungnlb.networks.inference_form
        self.unet = BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=1, features=features)
        final = self.unet.final_conv  # same parameters and state_dict keys, computed as one matrix product
        self.unet.final_conv = PointwiseConv2d(final.in_channels, final.out_channels)
        self.unet.final_conv.load_state_dict(final.state_dict())
        self.nlb = nn.ModuleDict(
            {
                f"level{level}": NonLocalBlock2d(features[level], grid, nlb_variant, inner_channels, distance)
                for level in levels
            }
        )
        self.bottleneck = bottleneck if bottleneck is not None else nn.Identity()
        self.classifier = nn.Linear(features[DEPTH], 1)
        self.deep_supervision = deep_supervision
        if deep_supervision:  # decoder outputs after upcat_2 (H/2) and upcat_3 (H/4)
            self.deep_heads = nn.ModuleList(PointwiseConv2d(features[level], 1) for level in (1, 2))
        symmetric = nlb_variant in ("symmetry", "symmetry_localized")
        self.size_divisor = unet_size_divisor(levels, grid, symmetric)

    def forward(self, x: torch.Tensor, return_attention: bool = False, return_features: bool = False) -> dict:
        check_input_size(x, self.size_divisor, self.name)
        if self.fast_inference:
            x = channels_last(x)
        unet, attention = self.unet, {}
        skips = [unet.conv_0(x)]
        for level, down in enumerate((unet.down_1, unet.down_2, unet.down_3, unet.down_4), start=1):
            features = down(skips[-1])
            block = self.nlb[f"level{level}"] if f"level{level}" in self.nlb else None
            if block is not None:
                features, attention[f"level{level}"] = block(features, return_attention=True)
            skips.append(features)
        deepest = self.bottleneck(skips[DEPTH])
        up, decoded = deepest, []  # decoder outputs at H/4 and H/2, kept for deep supervision only
        supervised = self.deep_supervision and self.training
        for upcat, skip in zip((unet.upcat_4, unet.upcat_3, unet.upcat_2, unet.upcat_1), reversed(skips[:DEPTH])):
            up = upcat.convs(torch.cat([skip, upcat.upsample(up)], dim=1))  # MONAI UpCat, no padding needed
            if supervised and upcat in (unet.upcat_3, unet.upcat_2):
                decoded.append(up)
        pooled = deepest.mean(dim=(2, 3))
        output = {"seg": unet.final_conv(up), "cls": self.classifier(pooled)}
        if supervised:  # heads in the order H/2, H/4
            output["seg_deep"] = [head(features) for head, features in zip(self.deep_heads, reversed(decoded))]
        if return_attention:
            output["attention"] = attention
        if return_features:
            output["features"] = pooled
        return output
