"""The DAFL generator's last convolution (one output channel) where gradients flow, in C
(``cpu_kernels.c``, built by ``tadfkd.models.kernels``; ``speed.output_conv_kernel``).

In the generator step, under bf16 autocast on a CPU, oneDNN ran this 3x3 convolution of 16
channels into one at a few percent of the bf16 matmul rate (docs/performance.md, round
sixteen). The kernels compute it as autocast does: the input, weight and bias in bf16, products
summed in float32, the output rounded once to bf16; the backward's three gradients likewise
(x's rounded once to bf16, the weight's and the bias's summed in float32 within a row and in
float64 across rows, then rounded to bf16 as autocast's bf16 gradients are, before the cast back
to the parameters' float32). The sums run in another order than oneDNN's, so a bit may differ
where a sum lies near a rounding boundary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from tadfkd.models import fused, kernels, pooling, upsampling

MAX_THREADS = 2  # as the fused generator kernels: one thread each, beside torch's second
MAX_CHANNELS = 64  # cpu_kernels.c: MAX_CONV_ONE_CHANNELS


def applies(layer: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the kernels compute ``layer(x)`` here, gradients included: gradients recorded,
    bf16 autocast on the CPU, x bf16 (N, C, H, W) channels-last with C a multiple of 16 up to
    ``MAX_CHANNELS``, ``layer`` a plain 3x3 convolution into one channel (padding 1 of zeros,
    stride 1) with float32 parameters and no hooks, and what every kernel needs
    (``kernels.may_run_with_grad``)."""
    if not torch.is_grad_enabled() or not kernels.may_run_with_grad(x, MAX_THREADS):
        return False
    if not kernels.bf16_autocast():
        return False
    channels = x.shape[1] if x.dim() == 4 else 0
    if x.dtype != torch.bfloat16 or channels % 16 != 0 or not 16 <= channels <= MAX_CHANNELS:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    parameters = [layer.weight] + ([] if layer.bias is None else [layer.bias])
    return (
        type(layer) is nn.Conv2d
        and layer.out_channels == 1
        and layer.in_channels == channels
        and upsampling.same_size_3x3(layer)
        and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in parameters)
        and not pooling.hooked(layer)
    )


def convolved(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """``layer(x)`` by the kernels (``applies``), differentiable: (N, 1, H, W) bf16."""
    return OutputConv.apply(x, layer.weight, layer.bias)


def rounded(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 tensor rounded to bf16's values (as autocast casts it), in float32."""
    return None if tensor is None else tensor.detach().to(torch.bfloat16).float()


class OutputConv(torch.autograd.Function):
    """The convolution into one channel and its gradients by the kernels (first order)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        taps, channels = rounded(weight), x.shape[1]
        ones = torch.ones(channels, dtype=torch.float32)
        zeros = torch.zeros(channels, dtype=torch.float32)
        # the fused kernel with the identity map (scale 1, shift 0, slope 1): the convolution
        out = fused.affine_leaky_relu_conv_one(x, taps, rounded(bias), ones, zeros, 1.0)
        ctx.save_for_backward(x, taps)
        ctx.has_bias = bias is not None
        # bf16 in PyTorch's layout for the convolution's output (channels-last)
        return out.to(dtype=torch.bfloat16, memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, taps = ctx.saved_tensors
        grad_x, grad_w, grad_b = conv_one_backward(x, grad.float().contiguous(), taps)
        # rounded as autocast's bf16 gradients, returned in the parameters' float32
        grad_w = rounded(grad_w.view_as(taps))
        return grad_x, grad_w, rounded(grad_b) if ctx.has_bias else None


@kernels.operator("conv_one_backward")
def conv_one_backward(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the 3x3, padding-1 convolution into one channel of x (N, C, H, W)
    bf16, channels-last, with ``weight`` (1, C, 3, 3) float32, for its output's gradient
    ``grad`` (N, 1, H, W) float32: x's (bf16, channels-last), the weight's (1, C, 3, 3) and
    the bias's (1,), float32."""
    n, channels, h, w = x.shape
    kernels.require(grad.shape == (n, 1, h, w) and grad.dtype == torch.float32, "a gradient")
    kernels.require(grad.is_contiguous() and weight.shape == (1, channels, 3, 3), "a weight")
    taps = weight[0].permute(1, 2, 0).contiguous()  # (3, 3, C)
    grad_x = kernels.empty_bf16((n, channels, h, w))
    grad_taps = torch.empty_like(taps)
    grad_bias = torch.empty(1, dtype=torch.float32)
    kernels.run_kernel(
        "conv_one_backward",
        *kernels.layout(x),
        grad.data_ptr(),
        kernels.pointer(taps),
        grad_x.data_ptr(),
        grad_taps.data_ptr(),
        grad_bias.data_ptr(),
    )
    return grad_x, grad_taps.permute(2, 0, 1).unsqueeze(0).contiguous(), grad_bias


@conv_one_backward.register_fake
def conv_one_backward_fake(x, grad, weight):
    """The gradients' shapes, dtypes and layouts, for tracing (``torch.library.opcheck``)."""
    return (
        kernels.empty_bf16(tuple(x.shape), x.device),
        weight.new_empty(weight.shape),  # contiguous, as the function returns it
        weight.new_empty(1),
    )


@register_flop_formula(torch.ops.tadfkd.conv_one_backward, get_raw=True)
def conv_one_backward_flops(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, *args, out_val, **kwargs
) -> int:
    """As ``FlopCounterMode`` counts ``convolution_backward``: x's gradient and the weight's,
    each as many as the forward (2 x outputs x weights per output)."""
    return 2 * (2 * grad.numel() * weight[0].numel())
