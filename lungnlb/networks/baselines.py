"""Baselines of the paper's tables: U-Net++, ResNet-50, EfficientNet-B4, DeepLabV3+.

All are built from MONAI networks with random initialisation (nothing downloads).
Segmentation models return {"seg": (B, 1, H, W), "cls": (B, 1)} logits, classifiers {"cls": (B, 1)}.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNetPlusPlus, EfficientNetBN, ResNetFeatures, resnet50
from torch import nn

from .unet_nlb import FEATURES, check_input_size


class UNetPlusPlusSegCls(nn.Module):
    """MONAI BasicUNetPlusPlus + classification head on its deepest encoder features (conv_4_0)."""

    size_divisor = 16

    def __init__(self, in_channels: int = 1, features: Sequence[int] = FEATURES) -> None:
        super().__init__()
        self.net = BasicUNetPlusPlus(spatial_dims=2, in_channels=in_channels, out_channels=1, features=features)
        self.classifier = nn.Linear(features[4], 1)
        self._pooled: list[torch.Tensor] = []
        self.net.conv_4_0.register_forward_hook(lambda module, args, output: self._pooled.append(output.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> dict:
        check_input_size(x, self.size_divisor, "unetpp")
        self._pooled.clear()
        seg = self.net(x)[-1]
        return {"seg": seg, "cls": self.classifier(self._pooled.pop())}


class Classifier(nn.Module):
    """Wrap a network that maps (B, C, H, W) to (B, 1) logits so it returns {"cls": logits}."""

    size_divisor = 32

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net, self.name = net, name

    def forward(self, x: torch.Tensor) -> dict:
        check_input_size(x, self.size_divisor, self.name)
        return {"cls": self.net(x)}


def build_resnet50(in_channels: int = 1) -> Classifier:
    """MONAI 2D ResNet-50, random weights, one output logit; 7x7 stride-2 stem as in He et al.

    (MONAI's default stem stride is 1, which quadruples the cost of every later stage.)
    """
    net = resnet50(pretrained=False, spatial_dims=2, n_input_channels=in_channels, num_classes=1, conv1_t_stride=2)
    return Classifier(net, "resnet50")


def build_efficientnet_b4(in_channels: int = 1) -> Classifier:
    """MONAI 2D EfficientNet-B4, random weights, one output logit."""
    net = EfficientNetBN("efficientnet-b4", pretrained=False, spatial_dims=2, in_channels=in_channels, num_classes=1)
    return Classifier(net, "efficientnet_b4")


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017): 1x1, three dilated 3x3, image pooling -> 1x1."""

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (3, 6, 9)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, out_channels, 1)])
        self.branches.extend(_conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates)
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.project = _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooling(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al. 2018) on MONAI's ResNet-50, output stride 32, + classification head.

    Encoder: ResNet-50 features; ASPP on the stride-32 features (rates 3, 6, 9: the paper's 6, 12, 18
    halved for output stride 32, as MONAI's ResNet has no dilated stages). Decoder: ASPP output
    upsampled to stride 4, concatenated with the stride-4 features reduced to 48 channels, two 3x3
    convolutions, 1x1 to one logit, bilinear upsampling to the input size. Classification: global
    average pooling of the stride-32 features + linear.
    """

    size_divisor = 32

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.encoder = ResNetFeatures("resnet50", pretrained=False, spatial_dims=2, in_channels=in_channels)
        self.aspp = ASPP(2048)
        self.reduce_low = _conv_bn_relu(256, 48, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(256 + 48, 256, 3), _conv_bn_relu(256, 256, 3), nn.Conv2d(256, 1, 1))
        self.classifier = nn.Linear(2048, 1)

    def forward(self, x: torch.Tensor) -> dict:
        check_input_size(x, self.size_divisor, "deeplabv3plus")
        features = self.encoder(x)
        low, deep = features[1], features[-1]
        context = F.interpolate(self.aspp(deep), size=low.shape[-2:], mode="bilinear", align_corners=False)
        seg = self.decoder(torch.cat([context, self.reduce_low(low)], dim=1))
        seg = F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"seg": seg, "cls": self.classifier(deep.mean(dim=(2, 3)))}


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
