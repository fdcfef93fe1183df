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
    """MONAI BasicUNetPlusPlus + classification head on its deepest encoder features (conv_4_0).

    The nested nodes are evaluated here, from the network's own modules, so the deepest features
    are a local value of the forward pass (no hook, no state kept between calls):

        x[i][0] = conv_i_0(x[i-1][0])                                   (x[-1][0] = input)
        x[i][j] = upcat_i_j(x[i+1][j-1], cat(x[i][0], ..., x[i][j-1]))   j >= 1, i + j <= 4
        seg = final_conv_0_4(x[0][4]),  cls = Linear(mean_HW x[4][0])
    """

    size_divisor = 16

    def __init__(self, in_channels: int = 1, features: Sequence[int] = FEATURES) -> None:
        super().__init__()
        self.net = BasicUNetPlusPlus(spatial_dims=2, in_channels=in_channels, out_channels=1, features=features)
        self.classifier = nn.Linear(features[4], 1)

    def forward(self, x: torch.Tensor) -> dict:
        check_input_size(x, self.size_divisor, "unetpp")
        nodes = [[self.net.conv_0_0(x)]]
        for i in range(1, 5):
            nodes.append([getattr(self.net, f"conv_{i}_0")(nodes[i - 1][0])])
        for j in range(1, 5):
            for i in range(0, 5 - j):
                skip = nodes[i][0] if j == 1 else torch.cat(nodes[i][:j], dim=1)
                nodes[i].append(getattr(self.net, f"upcat_{i}_{j}")(nodes[i + 1][j - 1], skip))
        seg = self.net.final_conv_0_4(nodes[0][4])
        return {"seg": seg, "cls": self.classifier(nodes[4][0].mean(dim=(2, 3)))}


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
