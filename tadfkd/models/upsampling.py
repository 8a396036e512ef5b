"""A 3x3 convolution of a nearest-2x-upsampled input, computed on the input before upsampling.

Each output pixel of ``conv(F.interpolate(x, scale_factor=2))`` at row 2i + a, column 2j + b
(its phase (a, b)) sees only a 2x2 window of x: the three rows of the 3x3 kernel fall on rows
i - 1, i, i (a = 0) or i, i, i + 1 (a = 1), and the columns alike. So the convolution is four
2x2 convolutions of x, one per phase, whose kernels add up the taps that fall on the same input
pixel (``phase_weights``): w1 * v + w2 * v computed as (w1 + w2) * v, equal up to float
rounding, with 4 x 4 taps on (H + 1) x (W + 1) pixels instead of 9 on 2H x 2W, 0.47-0.69 of the
multiplies at the DAFL generators' 4- to 32-pixel inputs (0.58 and 0.51 at Fashion-MNIST's 7
and 14), and no upsampled tensor in memory. The four phases run as one convolution with four
times the output channels; ``interleave_phases`` puts their outputs where the upsampled
convolution has them.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tadfkd.models import kernels

# the copying kernels run on one thread: beyond two, PyTorch's parallel copies are left to it
MAX_THREADS = 2


def applies(conv: nn.Module) -> bool:
    """Whether ``upsampled_conv`` computes ``conv``: a plain ``nn.Conv2d`` 3x3, stride 1, zero
    padding 1, no dilation or groups, and no forward hooks (it is not called as a module, so
    they would not run; a weight norm's pre-forward hook would leave its weight stale)."""
    return (
        type(conv) is nn.Conv2d
        and not conv._forward_hooks
        and not conv._forward_pre_hooks
        and same_size_3x3(conv)
    )


def same_size_3x3(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a 3x3 convolution that keeps the image size: stride 1, zero padding
    1, no dilation or groups."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """The 2x2 kernels of the four phases of a 3x3 ``weight`` (O, C, 3, 3): (4 O, C, 2, 2),
    phase (a, b) in rows (2a + b) O to (2a + b + 1) O. Sums of taps in the weight's dtype (no
    autocast applies to additions)."""

    def by_phase(taps: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the taps on offsets -1, 0, 1 of dim -> those of phase 0 (rows i-1, i) and 1 (i, i+1)
        first, middle, last = taps.unbind(dim)
        return (
            torch.stack([first, middle + last], dim),
            torch.stack([first + middle, last], dim),
        )

    return torch.cat([both for rows in by_phase(weight, 2) for both in by_phase(rows, 3)])


def phases(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The four phases' 2x2 convolutions of x (N, C, H, W) for a 3x3 ``conv`` (``applies``):
    (N, 4 O, H + 1, W + 1), for ``interleave_phases``; under autocast as the convolution is (the
    phase kernels summed in the weight's dtype, then cast)."""
    weight, bias = phase_parameters(conv, x.device.type)
    return F.conv2d(x, weight, bias, padding=1)


# per convolution, for no-grad forwards: copies of the parameters they were made from, the
# dtype, and the phase kernels and bias
_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def phase_parameters(conv: nn.Conv2d, device_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s phase kernels (``phase_weights``, in the weight's memory format) and its bias
    once per phase, (4 O,), in the dtype autocast gives the convolution (the weight's without
    autocast). Made afresh where gradients flow; in no-grad forwards kept while the parameters
    hold the values they were made from (compared in full on every call, a few microseconds:
    version counters miss fused optimisers and writes through ``.data``): the generator's
    weights change once an iteration, its no-grad forwards run some 20 times."""
    weight, bias = conv.weight, conv.bias
    dtype = weight.dtype
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    fresh = torch.is_grad_enabled() or torch.compiler.is_compiling()
    if not fresh and conv in _made:
        (was_weight, was_bias, was_dtype), made = _made[conv]
        if (
            was_dtype == dtype
            and kernels.same_values(weight, was_weight)
            and kernels.same_values(bias, was_bias)
        ):
            return made
    layout = memory_format_of(weight)
    weights = phase_weights(weight).to(dtype).contiguous(memory_format=layout)
    made = (weights, None if bias is None else bias.repeat(4).to(dtype))
    if not fresh:
        copies = (weight.detach().clone(), None if bias is None else bias.detach().clone(), dtype)
        _made[conv] = (copies, made)
    return made


def forget_phase_kernels() -> None:
    """Drop every kept phase kernel (the next no-grad forwards make them again): for code that
    replays an iteration and needs the same operators to run each time (the benchmarks)."""
    _made.clear()


def upsampled_conv(x: torch.Tensor, conv: nn.Conv2d, copy_kernels: bool = False) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2))`` for x (N, C, H, W) and a 3x3 ``conv``
    (``applies``), by phase (module docstring); differentiable. ``copy_kernels``: the phases
    put in place (and their gradient back) by C kernels where they apply (the generator's
    ``speed.fused_generation``), else by PyTorch's copies."""
    return interleave_phases(phases(x, conv), copy_kernels)


def interleave_phases(phased: torch.Tensor, copy_kernels: bool = False) -> torch.Tensor:
    """(N, 4 C, H + 1, W + 1), the four phases' outputs at the windows' positions (the 2x2
    convolution of x padded by 1), -> (N, C, 2H, 2W), the upsampled convolution: pixel
    (2i + a, 2j + b) is phase (a, b) at (i + a, j + b). Channels-last in, channels-last out;
    differentiable (the gradient goes back by the same four copies); with ``copy_kernels``,
    copied by C kernels where ``copies_by_kernel``."""
    return InterleavePhases.apply(phased, copy_kernels)


class InterleavePhases(torch.autograd.Function):
    """``interleave_phases`` and its backward, one copy per phase each way (autograd's own
    backward of four slice assignments allocates and adds four full-size gradients); with
    ``copy_kernels``, bf16 channels-last tensors on a CPU are copied by C kernels
    (``cpu_kernels.c``), bit for bit."""

    @staticmethod
    def forward(ctx, phased: torch.Tensor, copy_kernels: bool) -> torch.Tensor:
        ctx.phased_shape, ctx.layout = phased.shape, memory_format_of(phased)
        ctx.copy_kernels = copy_kernels
        if copy_kernels and copies_by_kernel(phased):
            return interleave_phases_kernel(phased)
        out = torch.empty(
            interleaved_shape(phased),
            dtype=phased.dtype,
            device=phased.device,
            memory_format=ctx.layout,
        )
        for pixels, phase in phase_views(out, phased):
            pixels.copy_(phase)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.copy_kernels and ctx.layout == torch.channels_last and copies_by_kernel(grad):
            return deinterleave_phases_kernel(grad), None
        # in the layout the phases came in, whatever the gradient's: the convolution's backward
        # takes it as its forward gave it
        phased = torch.empty(
            ctx.phased_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout
        ).zero_()
        for pixels, phase in phase_views(grad, phased):
            phase.copy_(pixels)
        return phased, None


def copies_by_kernel(x: torch.Tensor) -> bool:
    """Whether the C kernels can copy x's phases: a bf16 (N, C, H, W) tensor with its channels
    in unit stride, and what every kernel needs (``kernels.may_run``: a CPU tensor, at most
    ``MAX_THREADS`` torch threads, not while ``torch.compile`` traces; no gradients recorded,
    which inside the autograd function's forward and backward always holds)."""
    return (
        x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.stride(1) == 1
        and kernels.may_run(x, MAX_THREADS)
    )


@kernels.operator("interleave_phases")
def interleave_phases_kernel(phased: torch.Tensor) -> torch.Tensor:
    """``interleave_phases`` in C: phased (N, 4 C, H + 1, W + 1) bf16, channels in unit stride
    -> (N, C, 2H, 2W) bf16, channels-last."""
    return copied("interleave_phases", phased, interleaved_shape(phased))


@interleave_phases_kernel.register_fake
def interleave_phases_fake(phased):
    """The interleaved output's shape, dtype and layout, for tracing."""
    return kernels.empty_bf16(interleaved_shape(phased), phased.device)


@kernels.operator("deinterleave_phases")
def deinterleave_phases_kernel(grad: torch.Tensor) -> torch.Tensor:
    """``interleave_phases``' backward in C: the gradient (N, C, 2H, 2W) bf16, channels in unit
    stride -> the phases' gradient (N, 4 C, H + 1, W + 1) bf16, channels-last, zero where no
    output pixel came from."""
    return copied("deinterleave_phases", grad, phased_shape(grad))


@deinterleave_phases_kernel.register_fake
def deinterleave_phases_fake(grad):
    """The phases' gradient's shape, dtype and layout, for tracing."""
    return kernels.empty_bf16(phased_shape(grad), grad.device)


def copied(kernel: str, x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """x (bf16) copied by the C ``kernel`` into a new bf16 channels-last tensor of ``shape``."""
    out = kernels.empty_bf16(shape)
    kernels.run_kernel(kernel, *kernels.layout(x), out.data_ptr())
    return out


def interleaved_shape(phased: torch.Tensor) -> tuple[int, int, int, int]:
    """The upsampled convolution's shape (N, C, 2H, 2W) for phases (N, 4 C, H + 1, W + 1)."""
    n, channels, rows, columns = phased.shape
    return (n, channels // 4, 2 * (rows - 1), 2 * (columns - 1))


def phased_shape(upsampled: torch.Tensor) -> tuple[int, int, int, int]:
    """The phases' shape (N, 4 C, H + 1, W + 1) for an upsampled convolution (N, C, 2H, 2W)."""
    n, channels, rows, columns = upsampled.shape
    return (n, 4 * channels, rows // 2 + 1, columns // 2 + 1)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """Channels-last where x is, else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def phase_views(
    upsampled: torch.Tensor, phased: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per phase (a, b): the view of ``upsampled`` (N, C, 2H, 2W) at its pixels (2i + a,
    2j + b) and the view of ``phased`` (N, 4 C, H + 1, W + 1) that holds them."""
    channels, h, w = upsampled.shape[1], phased.shape[2] - 1, phased.shape[3] - 1
    grid = upsampled.unflatten(2, (h, 2)).unflatten(4, (w, 2))  # (N, C, i, a, j, b)
    views = []
    for a in (0, 1):
        for b in (0, 1):
            block = (2 * a + b) * channels
            phase = phased[:, block : block + channels, a : a + h, b : b + w]
            views.append((grid[:, :, :, a, :, b], phase))
    return views
