"""CIFAR VGGs with batch norm, with the parameter names of the CMI / Fast-DFKD teacher zoo.

Five conv groups `block0..block4`, each a Sequential of (conv3x3 with bias, BN, ReLU) whose last
ReLU is applied in `forward`; max pools `pool0..pool3` between groups (`pool3` only for inputs of
64 pixels or more, as in the zoo), a global average pool `pool4` and a linear `classifier`.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VGG8_GROUPS = ((64,), (128,), (256,), (512,), (512,))
VGG11_GROUPS = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def _conv_group(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    # The zoo drops the group's last ReLU (to expose pre-activation features).
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN over five conv groups; 32x32 or 64x64 input."""

    def __init__(
        self, groups: Sequence[Sequence[int]], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        widths_in = [in_channels] + [group[-1] for group in groups[:-1]]
        for index, (group, width_in) in enumerate(zip(groups, widths_in, strict=True)):
            self.add_module(f"block{index}", _conv_group(width_in, group))
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(groups[-1][-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), normalised -> logits (B, num_classes)."""
        size = x.shape[-1]
        # Max pools before the ReLU: ReLU is monotonic, so this equals pooling after it in value
        # and gradient, at a quarter of the ReLU's memory traffic.
        out = F.relu(self.pool0(self.block0(x)))
        out = F.relu(self.pool1(self.block1(out)))
        out = F.relu(self.pool2(self.block2(out)))
        out = F.relu(self.block3(out))
        if size >= 64:
            out = self.pool3(out)
        out = self.pool4(F.relu(self.block4(out)))
        return self.classifier(out.flatten(1))


def vgg8(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-8 with BN (the zoo's `vgg8`, i.e. `vgg8_bn`)."""
    return VGG(VGG8_GROUPS, num_classes, in_channels)


def vgg11(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-11 with BN (the zoo's `vgg11`, i.e. `vgg11_bn`)."""
    return VGG(VGG11_GROUPS, num_classes, in_channels)
