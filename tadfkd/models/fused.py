"""The DAFL generator's no-grad bf16 forward on a CPU through fused C kernels.

``cpu_kernels.c`` (built at first use by ``tadfkd.models.kernels``) does each BatchNorm-LeakyReLU
pair with the upsampling that follows it, and the last pair with the one-output-channel
convolution that follows it, in one pass over memory; PyTorch's kernels take three to five.
Where the generator computes its upsampled convolutions by phase (``phased_upsampling``,
``tadfkd.models.upsampling``), the first two pairs run without their upsampling. Where nothing
compiles it, the generator runs PyTorch's kernels.

The kernels are torch custom operators (``torch.ops.tadfkd.*``), so ``FlopCounterMode`` counts
the last convolution's FLOPs as it counts PyTorch's, and dispatch modes see each call (where
none could, ``kernels.Operator`` calls the function without the dispatcher).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from tadfkd.models import kernels, upsampling

MAX_CHANNELS = 1024  # cpu_kernels.c's per-channel arrays
# the kernels run on one thread: beyond two, PyTorch's parallel kernels are left to it (the
# kernels were measured to pay at one thread and to break even at two, docs/performance.md)
MAX_THREADS = 2


@kernels.operator("batch_norm_scale_shift", mutates_args=("running_mean", "running_var"))
def batch_norm_scale_shift(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    batch_statistics: bool,
    momentum: float,
    eps: float,
    phased: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm2d's per-channel map ``scale * x + shift`` (each (C,), float32) for x
    (N, C, H, W) bf16: from the batch's statistics, updating the running ones (when given)
    with ``momentum``, or from the running ones. ``phased``: for the upsampled convolution
    whose phases x holds, read in place (``kernels.pixels``)."""
    channels = channels_of(x, phased)
    scale = torch.empty(channels, dtype=torch.float32)
    shift = torch.empty(channels, dtype=torch.float32)
    kernels.run_kernel(
        "batch_norm_scale_shift",
        *kernels.pixels(x, phased),
        kernels.pointer(weight),
        kernels.pointer(bias),
        eps,
        int(batch_statistics),
        momentum,
        kernels.pointer(running_mean),
        kernels.pointer(running_var),
        kernels.pointer(scale),
        kernels.pointer(shift),
    )
    return scale, shift


@batch_norm_scale_shift.register_fake
def batch_norm_scale_shift_fake(
    x, weight, bias, running_mean, running_var, batch_statistics, momentum, eps, phased=False
):
    """The per-channel scale and shift's shapes, for tracing (``torch.library.opcheck``)."""
    scale = x.new_empty(channels_of(x, phased), dtype=torch.float32)
    return scale, torch.empty_like(scale)


def channels_of(x: torch.Tensor, phased: bool) -> int:
    """The channels of x (N, C, H, W), or with ``phased`` of the upsampled convolution whose
    four phases x holds (``x.shape[1] // 4``)."""
    return x.shape[1] // 4 if phased else x.shape[1]


def unphased(x: torch.Tensor, phased: bool) -> tuple[int, int, int, int]:
    """x's shape, or with ``phased`` that of the upsampled convolution whose phases x holds."""
    return upsampling.interleaved_shape(x) if phased else tuple(x.shape)


@kernels.operator("affine_leaky_relu_upsample")
def affine_leaky_relu_upsample(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, slope: float
) -> torch.Tensor:
    """Nearest 2x upsampling of ``leaky_relu(scale * x + shift, slope)``: x (N, C, H, W) bf16
    -> (N, C, 2H, 2W) bf16, channels-last."""
    out = mapped_like(x, factor=2)
    pointers = (kernels.pointer(scale), kernels.pointer(shift))
    kernels.run_kernel(
        "affine_leaky_relu_upsample", *kernels.layout(x), *pointers, slope, out.data_ptr()
    )
    return out


@affine_leaky_relu_upsample.register_fake
def affine_leaky_relu_upsample_fake(x, scale, shift, slope):
    """The upsampled tensor's shape, dtype and layout, for tracing (``torch.library.opcheck``)."""
    return mapped_like(x, factor=2)


@kernels.operator("affine_leaky_relu")
def affine_leaky_relu(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, slope: float, phased: bool = False
) -> torch.Tensor:
    """``leaky_relu(scale * x + shift, slope)``: x (N, C, H, W) bf16 -> the same shape, bf16,
    channels-last. ``phased``: of the upsampled convolution whose phases x holds (its shape
    out), read in place (``kernels.pixels``)."""
    out = kernels.empty_bf16(unphased(x, phased), x.device)
    pointers = (kernels.pointer(scale), kernels.pointer(shift))
    pixels = kernels.pixels(x, phased)
    kernels.run_kernel("affine_leaky_relu", *pixels, *pointers, slope, out.data_ptr())
    return out


@affine_leaky_relu.register_fake
def affine_leaky_relu_fake(x, scale, shift, slope, phased=False):
    """The activation's shape, dtype and layout, for tracing (``torch.library.opcheck``)."""
    return kernels.empty_bf16(unphased(x, phased), x.device)


def mapped_like(x: torch.Tensor, factor: int) -> torch.Tensor:
    """An empty bf16 channels-last (N, C, factor H, factor W) for x (N, C, H, W)."""
    n, c, h, w = x.shape
    return kernels.empty_bf16((n, c, factor * h, factor * w), x.device)


@kernels.operator("affine_leaky_relu_conv_one")
def affine_leaky_relu_conv_one(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    slope: float,
    phased: bool = False,
) -> torch.Tensor:
    """The 3x3, padding-1 convolution with one output channel (``weight`` (1, C, 3, 3) and
    ``bias`` (1,), float32) of ``leaky_relu(scale * x + shift, slope)``, in float32: x
    (N, C, H, W) bf16, channels-last, C a multiple of 16 up to 64 -> (N, 1, H, W) float32.
    ``phased``: of the upsampled convolution whose phases x holds, read in place
    (``kernels.pixels``)."""
    n, _, h, w = unphased(x, phased)
    taps = weight[0].permute(1, 2, 0).float().contiguous()  # (3, 3, C)
    out = torch.empty((n, 1, h, w), dtype=torch.float32)
    kernels.run_kernel(
        "affine_leaky_relu_conv_one",
        *kernels.pixels(x, phased),
        kernels.pointer(scale),
        kernels.pointer(shift),
        slope,
        kernels.pointer(taps),
        0.0 if bias is None else float(bias),
        kernels.pointer(out),
    )
    return out


@affine_leaky_relu_conv_one.register_fake
def affine_leaky_relu_conv_one_fake(x, weight, bias, scale, shift, slope, phased=False):
    """The output's shape and dtype, for tracing (``torch.library.opcheck``)."""
    n, _, h, w = unphased(x, phased)
    return x.new_empty((n, 1, h, w), dtype=torch.float32)


@register_flop_formula(torch.ops.tadfkd.affine_leaky_relu_conv_one, get_raw=True)
def conv_one_flops(x: torch.Tensor, weight: torch.Tensor, *args, out_val, **kwargs) -> int:
    """As ``FlopCounterMode`` counts the convolution: 2 x outputs x weights per output."""
    return 2 * out_val.numel() * weight[0].numel()


def batch_norm_map(
    x: torch.Tensor, norm: nn.BatchNorm2d, phased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm`` on x (``phased``: on the upsampled convolution whose phases x holds) as a
    per-channel ``(scale, shift)``, with its side effects (the running statistics and their
    count) as ``norm(x)`` would have them."""
    batch_statistics = norm.training or norm.running_mean is None
    updates = norm.training and norm.track_running_stats
    momentum = 0.0
    if updates:
        norm.num_batches_tracked.add_(1)
        momentum = (
            norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
        )
    return batch_norm_scale_shift(
        x,
        norm.weight,
        norm.bias,
        norm.running_mean if updates or not batch_statistics else None,
        norm.running_var if updates or not batch_statistics else None,
        batch_statistics,
        momentum,
        norm.eps,
        phased,
    )


def applies(generator: nn.Module, z: torch.Tensor) -> bool:
    """Whether the fused forward computes ``generator(z)`` here: a batch of at least two under
    bf16 autocast, float32 BatchNorm parameters and statistics of at most ``MAX_CHANNELS``
    channels, and what every kernel needs (``kernels.may_run``: no gradients, a CPU batch, at
    most ``MAX_THREADS`` torch threads, not while ``torch.compile`` traces)."""
    if not kernels.may_run(z, MAX_THREADS) or z.shape[0] < 2:
        return False
    if not kernels.bf16_autocast():
        return False
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    tensors = [t for m in norms for t in (m.weight, m.bias, m.running_mean, m.running_var)]
    if any(t is not None and t.dtype != torch.float32 for t in tensors):
        return False
    return all(m.num_features <= MAX_CHANNELS for m in norms)


def forward(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``generator(z)`` (``tadfkd.models.generator.Generator``) through the fused kernels;
    call only where ``applies``. The last block runs PyTorch's kernels (the generator's
    ``output_layers``) unless the generator runs its output convolution as a depthwise one
    (``speed.depthwise_output``) and the kernel computes it (``takes_output_conv``)."""
    blocks0, blocks1, blocks2 = (
        generator.conv_blocks0,
        generator.conv_blocks1,
        generator.conv_blocks2,
    )
    size = generator.init_size
    out = generator.l1(z).view(z.shape[0], generator.width, size, size)
    # the kernels read any layout, but channels in unit stride run whole vectors: the copy
    # costs less than the statistics and the map lose reading the NCHW view's strided channels
    out = out.contiguous(memory_format=torch.channels_last)
    phased = False
    if generator.by_phase(blocks1, blocks1[0]) and generator.by_phase(blocks2[0], blocks2[0]):
        out = activated(out, blocks0[0], blocks0[1], upsample=False)
        out, phased = upsampled(out, blocks1[0])
        out = activated(out, blocks1[1], blocks1[2], upsample=False, phased=phased)
        out, phased = upsampled(out, blocks2[0])
    else:
        out = activated(out, blocks0[0], blocks0[1], upsample=True)
        out = activated(blocks1[0](out), blocks1[1], blocks1[2], upsample=True)
        out = blocks2[0](out)
    last = blocks2[3]
    if not (generator.depthwise_applies() and takes_output_conv(last, out, phased)):
        if phased:
            out = upsampling.interleave_phases(out, copy_kernels=True)
        return generator.output_layers(out)
    scale, shift = batch_norm_map(out, blocks2[1], phased)
    out = affine_leaky_relu_conv_one(
        out, last.weight, last.bias, scale, shift, blocks2[2].negative_slope, phased
    )
    return blocks2[4](out)


def upsampled(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, bool]:
    """``conv`` of x upsampled, by phase (``tadfkd.models.upsampling``): its four phases and
    True where the kernels read them in place (bf16, channels in unit stride), else the
    phases put in place and False."""
    phases = upsampling.phases(x, conv)
    if phases.dtype == torch.bfloat16 and phases.stride(1) == 1:
        return phases, True
    return upsampling.interleave_phases(phases, copy_kernels=True), False


def takes_output_conv(conv: nn.Conv2d, x: torch.Tensor, phased: bool = False) -> bool:
    """Whether ``affine_leaky_relu_conv_one`` computes ``conv`` on x (or, ``phased``, on the
    upsampled convolution whose phases x holds): one output channel, 3x3, padding 1 (zeros),
    stride 1; x bf16 channels-last with 16, 32, 48 or 64 channels."""
    channels = channels_of(x, phased)
    return (
        conv.out_channels == 1
        and upsampling.same_size_3x3(conv)
        and x.dtype == torch.bfloat16
        and channels % 16 == 0
        and channels <= 64
        and x.stride(1) == 1
    )


def activated(
    x: torch.Tensor,
    norm: nn.BatchNorm2d,
    activation: nn.LeakyReLU,
    upsample: bool,
    phased: bool = False,
) -> torch.Tensor:
    """``activation(norm(x))``, upsampled 2x (nearest) with ``upsample``, x bf16, in one kernel
    after the statistics; ``phased``: of the upsampled convolution whose phases x holds."""
    scale, shift = batch_norm_map(x, norm, phased)
    if upsample:
        return affine_leaky_relu_upsample(x, scale, shift, activation.negative_slope)
    return affine_leaky_relu(x, scale, shift, activation.negative_slope, phased)
