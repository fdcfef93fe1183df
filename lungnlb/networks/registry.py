"""Registry of the networks by name: `build_model`, `list_models`, `is_segmentation_model`, `size_divisor`.

Defaults of the NLB U-Nets (see docs/method.md and benchmarks/speed.py): blocks on encoder levels
2 and 3 (128x128 and 64x64 maps for a 512x512 input), an 8x8 grid, C' = C / 4 channels for
queries, keys and values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .baselines import DeepLabV3Plus, UNetPlusPlusSegCls, build_efficientnet_b4, build_resnet50
from .self_attention import PixelSelfAttention2d
from .unet_nlb import FEATURES, SegClsUNet, unet_size_divisor

NLB_LEVELS = (2, 3)
NLB_GRID = 8


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model, whether it segments, and the divisor its input size needs."""

    factory: Callable[..., nn.Module]
    segmentation: bool
    divisor: Callable[..., int]


def _nlb_unet(name: str, variant: str) -> ModelSpec:
    def factory(in_channels: int = 1, nlb_levels=NLB_LEVELS, grid: int = NLB_GRID, **kwargs) -> SegClsUNet:
        return SegClsUNet(in_channels, variant, nlb_levels, grid, name=name, **kwargs)

    def divisor(nlb_levels=NLB_LEVELS, grid: int = NLB_GRID, **_) -> int:
        return unet_size_divisor(nlb_levels, grid, symmetric=variant.startswith("symmetry"))

    return ModelSpec(factory, True, divisor)


def _unet_sa(in_channels: int = 1, heads: int = 8, **kwargs) -> SegClsUNet:
    return SegClsUNet(in_channels, bottleneck=PixelSelfAttention2d(FEATURES[4], heads), name="unet_sa", **kwargs)


def _fixed(value: int) -> Callable[..., int]:
    return lambda **_: value


_REGISTRY: dict[str, ModelSpec] = {
    "unet": ModelSpec(lambda in_channels=1, **kw: SegClsUNet(in_channels, name="unet", **kw), True, _fixed(16)),
    "unet_sa": ModelSpec(_unet_sa, True, _fixed(16)),
    "unet_nlb": _nlb_unet("unet_nlb", "basic"),
    "unet_localized_nlb": _nlb_unet("unet_localized_nlb", "localized"),
    "unet_sb_nlb": _nlb_unet("unet_sb_nlb", "symmetry"),
    "unet_sl_nlb": _nlb_unet("unet_sl_nlb", "symmetry_localized"),
    "unetpp": ModelSpec(UNetPlusPlusSegCls, True, _fixed(UNetPlusPlusSegCls.size_divisor)),
    "deeplabv3plus": ModelSpec(DeepLabV3Plus, True, _fixed(DeepLabV3Plus.size_divisor)),
    "resnet50": ModelSpec(build_resnet50, False, _fixed(32)),
    "efficientnet_b4": ModelSpec(build_efficientnet_b4, False, _fixed(32)),
}


def list_models() -> list[str]:
    """Names accepted by `build_model`, in registry order."""
    return list(_REGISTRY)


def _spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(name: str, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build the named network with random weights; kwargs go to its constructor."""
    return _spec(name).factory(in_channels=in_channels, **kwargs)


def is_segmentation_model(name: str) -> bool:
    """True if the model returns {"seg", "cls"}, False if it returns {"cls"} only."""
    return _spec(name).segmentation


def size_divisor(name: str, **kwargs) -> int:
    """Input height and width must be multiples of this (kwargs as given to `build_model`)."""
    return _spec(name).divisor(**kwargs)
