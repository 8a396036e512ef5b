"""BatchNorm in training, forward and backward, as C kernels on the CPU.

PyTorch's CPU BatchNorm is slow on the small channels-last tensors of the digits and
Fashion-MNIST settings: the student's BatchNorm layers, forward and backward, took several times
the time to read and write their tensors (docs/performance.md, round fifteen). The kernels
compute the same statistics, running-statistics update, output and gradients in float32 (in
other summation orders: equal to float rounding, closer to a float64 BatchNorm than PyTorch's
bf16 kernels, which round in bf16), the output and the input's gradient rounded once to the
input's dtype, in two passes each.

``use_kernel`` makes a model's plain ``nn.BatchNorm2d`` modules ``KernelBatchNorm2d``: the same
parameters, buffers, hooks and state-dict keys, with training forwards on eligible inputs
(``applies``) through the kernels and everything else (evaluation, other layouts or dtypes)
through PyTorch's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tadfkd.models import kernels

# the kernels run on one thread; beyond two, PyTorch's parallel BatchNorm is left to it
MAX_THREADS = 2
MAX_CHANNELS = 1024  # cpu_kernels.c


def eligible(norm: nn.Module) -> bool:
    """Whether the kernels can compute ``norm``'s training forwards: a plain
    ``nn.BatchNorm2d`` with affine float32 parameters, running statistics and a momentum (not a
    cumulative average), at most ``MAX_CHANNELS`` channels."""
    return (
        type(norm) in (nn.BatchNorm2d, KernelBatchNorm2d)
        and norm.affine
        and norm.track_running_stats
        and norm.momentum is not None
        and norm.num_features <= MAX_CHANNELS
        and all(
            t is not None and t.dtype == torch.float32 and t.device.type == "cpu"
            for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var)
        )
    )


def applies(norm: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """Whether the kernels compute ``norm(x)``: ``norm`` in training and ``eligible``, x a
    float32 or bf16 (N, C, H, W) tensor, channels-last, of at least two pixels (PyTorch
    raises on fewer); and what every kernel needs, with or without gradients
    (``kernels.may_run_with_grad``: a CPU tensor, at most ``MAX_THREADS`` torch threads, not
    while ``torch.compile`` traces, built kernels)."""
    if not norm.training or not eligible(norm):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4:
        return False
    if x.shape[1] != norm.num_features or pixel_count(x) < 2:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return kernels.may_run_with_grad(x, MAX_THREADS)


def pixel_count(x: torch.Tensor) -> int:
    """M = N H W, the pixels of x (N, C, H, W)."""
    return x.shape[0] * x.shape[2] * x.shape[3]


def channels_last(x: torch.Tensor, *per_channel: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), float32 or bf16, checked with its ``per_channel`` tensors (C,) (the
    kernels write C values to some), as the kernels read it: channels-last (a copy in that
    layout where a saved-tensor hook gave it back in another)."""
    kernels.require(x.dim() == 4, "a 4-d input")
    kernels.require(x.dtype in (torch.float32, torch.bfloat16), "a float32 or bf16 input")
    kernels.require(x.shape[1] <= MAX_CHANNELS, f"at most {MAX_CHANNELS} channels")
    shape = (x.shape[1],)
    kernels.require(all(t.shape == shape for t in per_channel), "one value a channel")
    return x.contiguous(memory_format=torch.channels_last)


@kernels.operator("batch_norm_train", mutates_args=("running_mean", "running_var"))
def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm of x (N, C, H, W) float32 or bf16, channels-last, in training: the output (x's
    dtype, channels-last), the batch's mean and 1 / sqrt(var + eps) (C,) float32; the running
    statistics updated in place."""
    x, channels = channels_last(x, weight, bias, running_mean, running_var), x.shape[1]
    out = torch.empty_like(x, memory_format=torch.channels_last)
    mean = torch.empty(channels, dtype=torch.float32)
    invstd = torch.empty(channels, dtype=torch.float32)
    kernels.run_kernel(
        "batch_norm_train",
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        pixel_count(x),
        channels,
        *(kernels.pointer(t) for t in (weight, bias)),
        eps,
        momentum,
        *(kernels.pointer(t) for t in (running_mean, running_var, mean, invstd)),
        out.data_ptr(),
    )
    return out, mean, invstd


@batch_norm_train.register_fake
def batch_norm_train_fake(x, weight, bias, running_mean, running_var, momentum, eps):
    """The outputs' shapes, dtypes and layouts, for tracing (``torch.library.opcheck``)."""
    stats = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.channels_last), stats, stats.clone()


@kernels.operator("batch_norm_train_backward")
def batch_norm_train_backward(
    x: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_norm_train``'s gradients for grad (its output's shape): x's (its dtype,
    channels-last), the weight's and the bias's (C,) float32."""
    x = channels_last(x, weight, mean, invstd)
    kernels.require(grad.shape == x.shape, "a gradient of the output's shape")
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    grad_in = torch.empty_like(x, memory_format=torch.channels_last)
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)
    kernels.run_kernel(
        "batch_norm_train_backward",
        x.data_ptr(),
        grad.data_ptr(),
        int(x.dtype == torch.bfloat16),
        pixel_count(x),
        x.shape[1],
        *(kernels.pointer(t) for t in (weight, mean, invstd)),
        grad_in.data_ptr(),
        *(kernels.pointer(t) for t in (grad_weight, grad_bias)),
    )
    return grad_in, grad_weight, grad_bias


@batch_norm_train_backward.register_fake
def batch_norm_train_backward_fake(x, grad, weight, mean, invstd):
    """The gradients' shapes, dtypes and layouts, for tracing."""
    grad_in = torch.empty_like(x, memory_format=torch.channels_last)
    return grad_in, torch.empty_like(weight), torch.empty_like(weight)


class BatchNormTrain(torch.autograd.Function):
    """``batch_norm_train`` with its gradients by the kernel (first order)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = batch_norm_train(
            x, weight, bias, running_mean, running_var, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_in, grad_weight, grad_bias = batch_norm_train_backward(x, grad, weight, mean, invstd)
        return grad_in, grad_weight, grad_bias, None, None, None, None


class KernelBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` whose training forwards run the kernels where they ``apply``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(self, x):
            return super().forward(x)
        self.num_batches_tracked.add_(1)  # as nn.BatchNorm2d's training forward
        return BatchNormTrain.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum, self.eps
        )


def use_kernel(model: nn.Module) -> list[str]:
    """Make each ``eligible`` plain ``nn.BatchNorm2d`` of ``model`` a ``KernelBatchNorm2d`` (in
    place: the same parameters, buffers and hooks); the paths made."""
    made = []
    for path, norm in model.named_modules():
        if type(norm) is nn.BatchNorm2d and eligible(norm):
            norm.__class__ = KernelBatchNorm2d
            made.append(path)
    return made
