"""A grayscale network's first convolution (one input channel) on the CPU through a C kernel
(``cpu_kernels.c``, built by ``tadfkd.models.kernels``).

oneDNN's convolution is slow for one input channel: on the Fashion-MNIST preset the frozen
teacher's first layer took 0.3-0.4 ms a batch of 64 in the loop for 3.6 MFLOP (docs/
performance.md). The kernel computes the same sums in float32 (float32 or bf16 in and out,
as ``F.conv2d`` and bf16 autocast have them) at a fraction of that. ``use_kernel`` swaps it
into a model's eligible convolutions: the folded teacher's run it in their no-grad forwards;
the generator step's teacher's and the student's (``bf16_only``) under bf16 autocast, with
gradients too (``KernelForward``: PyTorch's convolution backward). The swapped module runs
PyTorch's convolution wherever the kernel does not apply (other dtypes, more threads).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from tadfkd.models import kernels

MAX_KERNEL_SIZE = 7  # cpu_kernels.c: MAX_TAPS
OUTPUT_CHANNELS = (8, 16, 32, 48, 64)  # cpu_kernels.c: 16 to a vector, or 8 of one
# the kernel runs on one thread; at two torch threads oneDNN's two-threaded convolution made the
# Fashion-MNIST and digits iterations 1.0-4.6 ms shorter (docs/performance.md, round ten)
MAX_THREADS = 1
# an nn.Module's hook registries: a swapped module would lose what they hold
MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> list[int]:
    """(N, C, Ho, Wo) of the convolution of x (N, 1, H, W) with weight (C, 1, K, K), after
    checking what the kernel takes: one input channel, a square kernel of up to
    ``MAX_KERNEL_SIZE``, C 8 or a multiple of 16 up to 64, a stride of at least 1, at least one
    output pixel."""
    kernels.require(x.dim() == 4 and x.shape[1] == 1, "an input (N, 1, H, W)")
    kernels.require(
        weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[2] == weight.shape[3],
        "a weight (C, 1, K, K)",
    )
    channels, size = weight.shape[0], weight.shape[2]
    kernels.require(channels in OUTPUT_CHANNELS, "8, or 16 to 64 outputs by 16")
    kernels.require(
        1 <= size <= MAX_KERNEL_SIZE and stride >= 1 and padding >= 0,
        f"a kernel of up to {MAX_KERNEL_SIZE}, a stride of 1 or more, no negative padding",
    )
    out_h = (x.shape[2] + 2 * padding - size) // stride + 1
    out_w = (x.shape[3] + 2 * padding - size) // stride + 1
    kernels.require(out_h >= 1 and out_w >= 1, "an output of at least one pixel")
    return [x.shape[0], channels, out_h, out_w]


@kernels.operator("single_channel_conv")
def single_channel_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    bf16: bool,
    relu: bool,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` for x (N, 1, H, W) float32 or bf16 and
    float32 weight (C, 1, K, K) and bias (C,) (``output_shape`` says what it takes), in float32
    sums; with ``bf16`` as bf16 autocast runs it (x, weight and bias rounded to bf16, the
    output bf16); with ``relu``, ``torch.relu`` of that output, bit for bit (in bf16 of the
    rounded output, as PyTorch's ReLU after the convolution) but for a NaN's bits in bf16
    (a NaN either way; PyTorch's vectorised bf16 ReLU writes each as 0xffff). The output
    (N, C, Ho, Wo) is channels-last."""
    shape = output_shape(x, weight, stride, padding)
    kernels.require(x.dtype in (torch.float32, torch.bfloat16), "a float32 or bf16 input")
    kernels.require(bf16 or x.dtype == torch.float32, "a bf16 input with bf16")
    kernels.require(weight.dtype == torch.float32, "a float32 weight")
    kernels.require(bias is None or bias.shape == (shape[1],), "a bias (C,)")
    dtype = torch.bfloat16 if bf16 else torch.float32
    out = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    n, _, h, w = x.shape
    sn, _, sh, sw = x.stride()
    swc, _, swh, sww = weight.stride()
    kernels.run_kernel(
        "single_channel_conv",
        *(x.data_ptr(), int(x.dtype == torch.bfloat16), n, h, w, sn, sh, sw),
        *(weight.data_ptr(), shape[1], weight.shape[2], swc, swh, sww),
        kernels.pointer(bias),
        *(stride, padding, int(bf16), int(relu), out.data_ptr()),
    )
    return out


@single_channel_conv.register_fake
def single_channel_conv_fake(x, weight, bias, stride, padding, bf16, relu):
    """The output's shape, dtype and layout, for tracing (``torch.library.opcheck``)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    shape = output_shape(x, weight, stride, padding)
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)


@register_flop_formula(torch.ops.tadfkd.single_channel_conv, get_raw=True)
def single_channel_flops(
    x: torch.Tensor, weight: torch.Tensor, *args, out_val: torch.Tensor, **kwargs
) -> int:
    """As ``FlopCounterMode`` counts the convolution: 2 x outputs x weights per output."""
    return 2 * out_val.numel() * weight[0].numel()


def sharing_parameters(kind: type[nn.Conv2d], conv: nn.Conv2d) -> nn.Conv2d:
    """A ``kind`` (an ``nn.Conv2d`` subclass) of ``conv``'s shape and settings whose weight and
    bias are ``conv``'s own (made on the meta device: nothing of its own allocated), for
    ``kernels.swap_modules``' ``make``."""
    fast = kind(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    fast.weight, fast.bias = conv.weight, conv.bias
    return fast


def eligible(conv: nn.Module) -> bool:
    """Whether the kernel can compute ``conv``: a plain ``nn.Conv2d`` of one input channel,
    8, 16, 32, 48 or 64 output channels, a square kernel of up to 7, one stride and one zero
    padding for both dims, no dilation or groups; its weight a parameter of its own (not
    reparametrised), no hooks of any kind on it (the swap would lose them)."""
    return (
        type(conv) is nn.Conv2d
        and conv.in_channels == 1
        and conv.out_channels in OUTPUT_CHANNELS
        and conv.kernel_size[0] == conv.kernel_size[1] <= MAX_KERNEL_SIZE
        and conv.stride[0] == conv.stride[1]
        and not isinstance(conv.padding, str)
        and conv.padding[0] == conv.padding[1]
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.weight, nn.Parameter)
        and not any(getattr(conv, hooks, None) for hooks in MODULE_HOOKS)
    )


class SingleChannelConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` of one input channel (``eligible``) whose no-grad CPU forwards run the
    kernel where it ``applies``, and whose bf16-autocast forwards with gradients run it too
    where it ``applies_with_gradients`` (``KernelForward``); the same parameters and
    state-dict keys, and ``bf16_only`` (``use_kernel``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if applies(self, x):
            return self.kernel(x, relu=False)
        if applies_with_gradients(self, x):
            return KernelForward.apply(x, self.weight, self.stride[0], self.padding[0])
        return super().forward(x)

    def kernel(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        """The kernel's output for x where it ``applies``; with ``relu``, ``torch.relu`` of it
        (``tadfkd.models.pooling.PooledSequential`` fuses a ReLU after the convolution)."""
        return single_channel_conv(
            x,
            self.weight,
            self.bias,
            self.stride[0],
            self.padding[0],
            torch.is_autocast_enabled("cpu"),  # then bf16: applies
            relu,
        )


class KernelForward(torch.autograd.Function):
    """``conv(x)`` under bf16 autocast for a convolution without bias: the kernel's output (the
    same float32 sums of autocast's exact bf16 products, rounded once; oneDNN's order differs
    in rare sums, where an output rounds the other way by one bf16 step: docs/performance.md,
    round seventeen), and PyTorch's convolution backward on the bf16 casts autocast would give
    it, each gradient cast back as autocast's casts do: the same gradients for the same output
    gradient. First order only (``once_differentiable``; nothing here takes a second)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int):
        ctx.save_for_backward(x.to(torch.bfloat16), weight.to(torch.bfloat16))
        ctx.dtypes, ctx.geometry = (x.dtype, weight.dtype), (stride, padding)
        return single_channel_conv(x, weight, None, stride, padding, True, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (stride, padding), wanted = ctx.geometry, ctx.needs_input_grad[:2]
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            [stride] * 2,
            [padding] * 2,
            [1, 1],
            False,
            [0, 0],
            1,
            [*wanted, False],
        )
        (x_dtype, weight_dtype), (want_x, want_weight) = ctx.dtypes, wanted
        return (
            grad_x.to(x_dtype) if want_x else None,
            grad_weight.to(weight_dtype) if want_weight else None,
            None,
            None,
        )


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the kernel computes ``conv(x)`` here: what ``takes`` says, with no autocast or
    bf16 autocast (for a module swapped ``bf16_only``, under bf16 autocast only), and what
    every kernel needs (``kernels.may_run``: no gradients, a CPU input, at most
    ``MAX_THREADS`` torch threads, not while ``torch.compile`` traces)."""
    if getattr(conv, "bf16_only", False) and not kernels.bf16_autocast():
        return False
    return kernels.may_run(x, MAX_THREADS) and takes(conv, x)


def applies_with_gradients(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``KernelForward`` computes ``conv(x)`` here: gradients recorded, a module
    swapped ``bf16_only`` under bf16 autocast, no bias, a channels-last weight (PyTorch's
    output is then channels-last, as the kernel's is), what ``takes`` says, and what every
    kernel needs (``kernels.may_run_with_grad``)."""
    if not torch.is_grad_enabled() or not getattr(conv, "bf16_only", False):
        return False
    if conv.bias is not None or not kernels.bf16_autocast():
        return False
    # made channels-last (``.to(memory_format=...)``: strides (K*K, 1, K, 1)); one input
    # channel's NCHW strides pass is_contiguous(channels_last) too, but PyTorch's output is NCHW
    if conv.weight.stride(1) != 1:
        return False
    return kernels.may_run_with_grad(x, MAX_THREADS) and takes(conv, x)


def takes(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the kernel takes ``conv`` and x: an input of one channel, float32 parameters
    (the bias contiguous) and input with no autocast or bf16 autocast, an output of at least
    one pixel."""
    if x.dim() != 4 or x.shape[1] != 1:
        return False
    if not kernels.float32_parameters(conv):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return False
    elif x.dtype != torch.float32:
        return False
    reach = conv.kernel_size[0] - 2 * conv.padding[0]
    # no output pixel: PyTorch's convolution says what is wrong
    return min(x.shape[0], x.shape[2] - reach + 1, x.shape[3] - reach + 1) >= 1


def use_kernel(model: nn.Module, bf16_only: bool = False) -> list[str]:
    """Swap a ``SingleChannelConv2d`` (sharing the parameters) into ``model`` for each
    ``eligible`` convolution, at every path that holds it (one swapped module per
    convolution); the paths swapped. The swapped module runs the kernel in every no-grad
    forward where it ``applies``; ``bf16_only``: only under bf16 autocast, and there with
    gradients too (``applies_with_gradients``)."""

    def make(conv: nn.Conv2d) -> SingleChannelConv2d:
        fast = sharing_parameters(SingleChannelConv2d, conv)
        fast.bf16_only = bf16_only
        return fast

    return kernels.swap_modules(model, eligible, make)
