"""Tiny-ImageNet ResNets with the parameter names of the published TA-DFKD teacher.

Differences from the CIFAR ResNet: the stem conv has a bias, the projection is named
`downsample` and the classifier `fc`. Input is 64x64, 200 classes.
"""

from tadfkd.models.resnet_cifar import ResNet


def tiny_resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """Tiny-ImageNet ResNet-18, [2, 2, 2, 2] blocks (the published factory built [3, 4, 6, 3])."""
    return ResNet(
        [2, 2, 2, 2], num_classes, in_channels, stem_bias=True, projection="downsample", head="fc"
    )


def tiny_resnet34(num_classes: int, in_channels: int = 3) -> ResNet:
    """Tiny-ImageNet ResNet-34, [3, 4, 6, 3] blocks."""
    return ResNet(
        [3, 4, 6, 3], num_classes, in_channels, stem_bias=True, projection="downsample", head="fc"
    )
