"""Registry of classifier architectures, and the DAFL generator (with its fused CPU kernels for
no-grad bf16 forwards, ``tadfkd.models.fused``); a grayscale network's first convolution on
the CPU through a C kernel (``tadfkd.models.single_channel``); a ReLU and the
pooling after it as one C kernel, forward and backward (``tadfkd.models.pooling``); a frozen
network's float32 3x3 convolutions by Winograd's algorithm in C (``tadfkd.models.winograd``);
the kernels' build (``tadfkd.models.kernels``).

Every factory takes `(num_classes, in_channels=...)` and returns a plain `nn.Module` mapping
normalised images (B, C, H, W) to logits (B, num_classes).
"""

from collections.abc import Callable

from torch import nn

from tadfkd.base.errors import UserError
from tadfkd.models.digits import digits_cnn, digits_cnn_s, digits_cnn_w, digits_resnet
from tadfkd.models.generator import Generator
from tadfkd.models.resnet_cifar import resnet18, resnet34
from tadfkd.models.resnet_tiny import tiny_resnet18, tiny_resnet34
from tadfkd.models.vgg import vgg8, vgg11
from tadfkd.models.wrn import wrn16_1, wrn16_2, wrn40_1, wrn40_2

__all__ = ["ARCHITECTURES", "Generator", "build_classifier", "classifier_layer", "module_path"]

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "tiny_resnet18": tiny_resnet18,
    "tiny_resnet34": tiny_resnet34,
    "wrn16_1": wrn16_1,
    "wrn16_2": wrn16_2,
    "wrn40_1": wrn40_1,
    "wrn40_2": wrn40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "digits_cnn_s": digits_cnn_s,
    "digits_cnn": digits_cnn,
    "digits_cnn_w": digits_cnn_w,
    "digits_resnet": digits_resnet,
}


def build_classifier(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised classifier `arch` with `num_classes` outputs and `in_channels`
    input channels."""
    if arch not in ARCHITECTURES:
        raise UserError(
            f"unknown architecture '{arch}'; choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[arch](num_classes=num_classes, in_channels=in_channels)


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final linear layer of a registered classifier; its input is the penultimate
    feature (B, D), so a forward hook on it reads the features without changing `forward`."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]


def module_path(model: nn.Module, module: nn.Module) -> str:
    """The path of ``module`` inside ``model`` (as ``named_modules`` gives it)."""
    return next(name for name, candidate in model.named_modules() if candidate is module)
