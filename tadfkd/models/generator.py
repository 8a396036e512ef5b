"""The DAFL generator as used by TA-DFKD, with its published parameter names.

State-dict keys: `l1.*`, `conv_blocks0.0.*` (BN), `conv_blocks1.0.*` (conv), `conv_blocks1.1.*`
(BN), `conv_blocks2.0.*` (conv), `conv_blocks2.1.*` (BN), `conv_blocks2.3.*` (conv).
"""

import torch
import torch.nn.functional as F
from torch import nn

from tadfkd.base.errors import UserError
from tadfkd.models import fused, output_conv, upsampling


class Generator(nn.Module):
    """Noise (B, nz) -> images (B, channels, img_size, img_size) in [0, 1].

    ``width`` is the channel count of the first two blocks (the last has half of it); the
    published generator has 128. Narrower widths only suit small datasets (the digits default).

    ``depthwise_output`` (``speed.depthwise_output``, off by default): in no-grad forwards, a
    last convolution with one output channel (grayscale images) runs as a depthwise convolution
    and a float32 sum over its input channels: the same products and sums, faster on a CPU,
    where oneDNN runs a one-output-channel convolution far below its rate. Forwards
    with gradients keep the convolution, whose backward is the faster one.

    ``output_kernel`` (``speed.output_conv_kernel``, off by default): forwards with gradients
    under bf16 autocast on a CPU run that convolution, forward and backward, as C kernels
    (``tadfkd.models.output_conv``).

    ``fused_kernels`` (``speed.fused_generation``, off by default): no-grad forwards under bf16
    autocast on a CPU run each BatchNorm-LeakyReLU pair with the upsampling after it as one C
    kernel, and, where ``depthwise_output`` applies, the last pair with the one-output-channel
    convolution too (``tadfkd.models.fused``).

    ``phased_upsampling`` (``speed.phased_upsampling``, off by default): each convolution after
    an upsampling runs on the input before it, as four 2x2 convolutions
    (``tadfkd.models.upsampling``): the same sums up to float rounding, about half the
    multiplies.
    """

    def __init__(
        self, nz: int = 1000, img_size: int = 32, channels: int = 3, width: int = 128
    ) -> None:
        super().__init__()
        if img_size % 4 != 0:
            raise UserError(
                f"generator img_size={img_size} is not divisible by 4; "
                "set generator.img_size to the dataset's image size (e.g. 16, 32 or 64)"
            )
        self.init_size = img_size // 4
        self.width = width
        self.depthwise_output = False
        self.fused_kernels = False
        self.output_kernel = False
        self.phased_upsampling = False
        self.l1 = nn.Linear(nz, width * self.init_size**2)
        # TA-DFKD adds the LeakyReLU to DAFL's BN-only first block; it has no parameters. In
        # place, as DAFL's: BatchNorm's backward needs its input, not its output.
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True))
        # eps=0.8: DAFL passes 0.8 positionally, where BatchNorm2d expects eps.
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=1, padding=1),
            nn.BatchNorm2d(width, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, stride=1, padding=1),
            nn.BatchNorm2d(width // 2, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, channels, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, nz) -> (B, channels, img_size, img_size), values in [0, 1]."""
        if self.fused_kernels and fused.applies(self, z):
            return fused.forward(self, z)
        out = self.l1(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        if self.conv_blocks1[0].weight.is_contiguous(memory_format=torch.channels_last):
            # a channels-last generator (``speed.channels_last``) stays so from its first
            # activation: on a CPU, upsampling an NCHW tensor costs ten times as much
            out = out.contiguous(memory_format=torch.channels_last)
        out = self.conv_blocks0(out)
        block, conv = self.conv_blocks1, self.conv_blocks1[0]
        if self.by_phase(block, conv):
            out = block[2](block[1](upsampling.upsampled_conv(out, conv, self.fused_kernels)))
        else:
            out = block(F.interpolate(out, scale_factor=2))
        conv = self.conv_blocks2[0]
        if self.by_phase(conv, conv):
            return self.output_layers(upsampling.upsampled_conv(out, conv, self.fused_kernels))
        return self.output_layers(conv(F.interpolate(out, scale_factor=2)))

    def by_phase(self, called: nn.Module, conv: nn.Module) -> bool:
        """Whether ``conv`` (inside ``called``, the module the published forward calls) runs on
        its input before the upsampling, as four 2x2 convolutions: ``phased_upsampling`` on, and
        neither with forward hooks, which that path would skip (``upsampling.applies``)."""
        if not (self.phased_upsampling and upsampling.applies(conv)):
            return False
        return not (called._forward_hooks or called._forward_pre_hooks)

    def output_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The last block after its first convolution: BatchNorm, LeakyReLU, the output
        convolution (``output_conv``) and the sigmoid."""
        out = self.conv_blocks2[2](self.conv_blocks2[1](x))
        return self.conv_blocks2[4](self.output_conv(out))

    def output_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolution on x: as ``one_output_channel_conv`` where
        ``depthwise_output`` applies (one output channel, zero padding, no gradients), by the
        C kernels where ``output_kernel`` is on and they apply (``output_conv.applies``: with
        gradients), else as the convolution."""
        last = self.conv_blocks2[3]
        if self.depthwise_applies():
            return one_output_channel_conv(x, last)
        if self.output_kernel and output_conv.applies(last, x):
            return output_conv.convolved(x, last)
        return last(x)

    def depthwise_applies(self) -> bool:
        """Whether this forward runs the last convolution as a depthwise one."""
        last = self.conv_blocks2[3]
        return (
            self.depthwise_output
            and last.out_channels == 1
            and last.padding_mode == "zeros"
            and not torch.is_grad_enabled()
        )


def one_output_channel_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a convolution with one output channel, as a depthwise convolution of each
    input channel with its own kernel, summed over the channels in float32 (so under bf16
    autocast only the per-channel products are rounded, not their sum)."""
    per_channel = F.conv2d(
        x,
        conv.weight.transpose(0, 1),
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=conv.in_channels,
    )
    out = per_channel.sum(dim=1, keepdim=True, dtype=torch.float32)
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)
