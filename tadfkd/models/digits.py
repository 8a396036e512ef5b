"""Small classifiers for 16x16 grayscale digits (sklearn's 8x8 digits upsampled), fast on a CPU.

All contain BatchNorm2d layers, which the BN-statistics term of the generator loss needs. Any
image size divisible by 4 works (two 2x downsamplings, then a global average pool). Each reaches
about 98-99% test accuracy on sklearn digits after 30 epochs of SGD.
"""

from collections.abc import Sequence

import torch
from torch import nn

from tadfkd.models.resnet_cifar import ResNet


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class DigitsCNN(nn.Module):
    """Three conv3x3-BN-ReLU layers (`features`): the first with stride 2, a 2x2 max pool after
    the second; global average pool; linear `classifier`."""

    def __init__(self, widths: Sequence[int], num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        # Stride 2 at the stem: full-resolution layers dominate the CPU time, not accuracy.
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, widths[0], 2),
            *_conv_bn_relu(widths[0], widths[1], 1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(widths[1], widths[2], 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), normalised, H and W divisible by 4 -> logits (B, num_classes)."""
        return self.classifier(self.features(x))


def digits_cnn_s(num_classes: int, in_channels: int = 1) -> DigitsCNN:
    """Narrow digits CNN, widths 8-16-32."""
    return DigitsCNN((8, 16, 32), num_classes, in_channels)


def digits_cnn(num_classes: int, in_channels: int = 1) -> DigitsCNN:
    """Digits CNN, widths 16-32-64."""
    return DigitsCNN((16, 32, 64), num_classes, in_channels)


def digits_cnn_w(num_classes: int, in_channels: int = 1) -> DigitsCNN:
    """Wide digits CNN, widths 32-64-128."""
    return DigitsCNN((32, 64, 128), num_classes, in_channels)


def digits_resnet(num_classes: int, in_channels: int = 1) -> ResNet:
    """Tiny residual net: stride-2 stem, one basic block per stage at 16-32-64 channels."""
    return ResNet([1, 1, 1], num_classes, in_channels, widths=(16, 32, 64), stem_stride=2)
