"""CIFAR WideResNets with the parameter names of the CMI / Fast-DFKD teacher zoo.

WRN-d-k: a 3x3 stem with 16 channels, three groups `block1..block3` of (d - 4) / 6 pre-activation
blocks with 16k, 32k, 64k channels (strides 1, 2, 2), a final BN-ReLU (`bn1`), global average
pool and a linear head `fc`.
"""

import torch
import torch.nn.functional as F
from torch import nn


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus `convShortcut` (1x1) when
    the channel count changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_planes, H, W) -> (B, out_planes, H / stride, W / stride)."""
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in the zoo: the projection sees the pre-activated input, the identity the raw one.
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class BlockGroup(nn.Module):
    """A group of blocks, kept as `layer` so that keys read `block1.layer.0.conv1.weight`."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_planes, H, W) -> (B, out_planes, H / stride, W / stride)."""
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs (any size works through the global pool)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = BlockGroup(n, channels[0], channels[1], 1)
        self.block2 = BlockGroup(n, channels[1], channels[2], 2)
        self.block3 = BlockGroup(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He initialisation, as the zoo does; PyTorch's default trains these nets slower.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), normalised -> logits (B, num_classes)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn16_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-16-1 (0.18M parameters for 10 classes)."""
    return WideResNet(16, 1, num_classes, in_channels)


def wrn16_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, in_channels)


def wrn40_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes, in_channels)


def wrn40_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes, in_channels)
