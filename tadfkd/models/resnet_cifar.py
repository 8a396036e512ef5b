"""CIFAR ResNets with the parameter names of the published TA-DFKD / DAFL / CMI teachers.

The same `ResNet` class also builds the Tiny-ImageNet variant (`resnet_tiny.py`) and the small
residual net for digits (`digits.py`): they differ only in widths, stem bias and module names.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity or 1x1-conv-BN projection.

    The projection is registered under `projection` ("shortcut" in the CIFAR files,
    "downsample" in the Tiny-ImageNet ones); when the shape does not change it is an empty
    `nn.Sequential`, which adds no state-dict keys.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, projection: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.projection = projection
        self.add_module(projection, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_planes, H, W) -> (B, planes, H / stride, W / stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + getattr(self, self.projection)(x))


class ResNet(nn.Module):
    """3x3 stem, residual stages `layer1..layerN`, global average pool, linear head.

    The published nets use a stride-1 stem; stage i has `widths[i]` planes and stride 1 for the
    first stage, 2 afterwards.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_stride: int = 1,
        stem_bias: bool = False,
        projection: str = "shortcut",
        head: str = "linear",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=stem_bias
        )
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for index, (blocks, planes) in enumerate(zip(num_blocks, widths, strict=True)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(in_planes, planes, stride, projection))
                in_planes = planes
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.head = head
        self.add_module(head, nn.Linear(in_planes, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), normalised -> logits (B, num_classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{index}")(out)
        # The published 4x4 average pool equals a global pool on 32x32 inputs.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return getattr(self, self.head)(out)


def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-18 ([2, 2, 2, 2] basic blocks), 32x32 input."""
    return ResNet([2, 2, 2, 2], num_classes, in_channels)


def resnet34(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-34 ([3, 4, 6, 3] basic blocks), 32x32 input."""
    return ResNet([3, 4, 6, 3], num_classes, in_channels)
