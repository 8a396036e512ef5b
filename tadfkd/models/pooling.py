"""A ReLU and the pooling after it, in an ``nn.Sequential``, as one C kernel on the CPU.

The small networks of the digits and Fashion-MNIST settings end a stage with a ReLU and a 2x2
max pool and end their features with a ReLU and a global average pool. PyTorch runs each pair
as two passes over memory, and its max pool also writes the indices of the maxima: on the
Fashion-MNIST preset, 45 max pools took 7.5 ms an iteration and the ReLUs 6.3 ms, where one pass
that reads each window, takes its largest value and clamps it does for both (docs/performance.md,
round fourteen). Max and ReLU commute and round nothing, so the fused max pool equals
PyTorch's bit for bit, its gradient too (each window's gradient at the element PyTorch's max
pool picks, where ReLU passes it); the fused average sums in another order (float rounding).

``use_kernel`` makes a model's ``nn.Sequential`` containers ``PooledSequential``: the same
modules and state-dict keys, with each eligible pair (``fusable``) run by the kernels where they
apply, with or without gradients, and module by module where a hook is on either module (it
would see a ReLU output that the kernels never make) or the kernels do not apply. The same
containers also run a one-input-channel convolution's kernel (``tadfkd.models.single_channel``,
no-grad forwards) with the ReLU after it (``relu_after``) in the kernel's store, PyTorch's
ReLU of its output bit for bit (a NaN's bits aside, in bf16): on the Fashion-MNIST preset the
folded teacher's first ReLU was a pass of its own over each scored batch (docs/performance.md,
round seventeen). That needs both switches: ``speed.fused_pooling`` makes the containers,
``speed.single_channel_conv`` the kernel convolution. Likewise a convolution by Winograd's
algorithm (``tadfkd.models.winograd``, ``speed.winograd_conv``) runs with the ReLU-pool pair
after it (``pool_after``) in its kernel's output pass (round eighteen).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_globals

from tadfkd.models import kernels, single_channel, winograd
from tadfkd.models.single_channel import MODULE_HOOKS

# the kernels run on one thread; beyond two, PyTorch's parallel ReLU and pooling are left to it
MAX_THREADS = 2
MAX_CHANNELS = 1024  # cpu_kernels.c: the average's per-channel sums
# the kernels' channel loops run in whole vectors only for a multiple of 16 channels; for others
# their scalar remainder loops were slower than PyTorch's ReLU and pool in an ad hoc check (4 to
# 24 channels; docs/performance.md, round fifteen), so those run PyTorch's
CHANNEL_MULTIPLE = 16
# each pair's kernel in cpu_kernels.c; its backward is the name with "_backward"
KERNELS = {"max": "relu_max_pool", "mean": "relu_mean"}
# hooks every module runs (torch.nn.modules.module.register_module_forward_hook and the like)
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def fusable(relu: nn.Module, pool: nn.Module) -> str | None:
    """Which kernel computes ``pool(relu(x))``: ``"max"`` for a 2x2 ``nn.MaxPool2d`` of stride
    2 (no padding or dilation, floor mode, no indices returned), ``"mean"`` for an
    ``nn.AdaptiveAvgPool2d`` to one pixel, each after a plain, not in-place ``nn.ReLU``; None
    otherwise."""
    if type(relu) is not nn.ReLU or relu.inplace:
        return None
    if type(pool) is nn.MaxPool2d:
        square = pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
        plain = pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1))
        return (
            "max" if square and plain and not pool.ceil_mode and not pool.return_indices else None
        )
    if type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1)):
        return "mean"
    return None


def past_identities(modules: list[nn.Module], start: int) -> int:
    """The index of the first module from ``start`` on that is no ``nn.Identity`` (a BatchNorm
    folded away), or ``len(modules)``."""
    while start < len(modules) and type(modules[start]) is nn.Identity:
        start += 1
    return start


def relu_after(modules: list[nn.Module], index: int) -> int | None:
    """Where the ReLU is that the one-input-channel kernel convolution at ``index`` of
    ``modules`` (a ``SingleChannelConv2d``) runs in its store: the first module after it past
    any ``nn.Identity`` (a BatchNorm folded away), an ``nn.ReLU`` that starts no ``fusable``
    pair (that pair's kernel takes it instead); None otherwise."""
    if type(modules[index]) is not single_channel.SingleChannelConv2d:
        return None
    end = past_identities(modules, index + 1)
    if end == len(modules) or type(modules[end]) is not nn.ReLU:
        return None
    return end if end + 1 == len(modules) or fusable(*modules[end : end + 2]) is None else None


def pool_after(modules: list[nn.Module], index: int) -> tuple[int, str] | None:
    """Where the ReLU-pool pair ends that the Winograd convolution at ``index`` of ``modules``
    (a ``WinogradConv2d``) runs in its kernel, and its kind: the pair (``fusable``) first
    after it past any ``nn.Identity`` (a BatchNorm folded away); None otherwise."""
    if type(modules[index]) is not winograd.WinogradConv2d:
        return None
    start = past_identities(modules, index + 1)
    kind = fusable(*modules[start : start + 2]) if start + 1 < len(modules) else None
    return None if kind is None else (start + 1, kind)


def hooked(*modules: nn.Module) -> bool:
    """Whether a hook of any kind is on one of ``modules`` or on every module."""
    if any(getattr(module_globals, hooks) for hooks in GLOBAL_HOOKS):
        return True
    return any(getattr(module, hooks, None) for module in modules for hooks in MODULE_HOOKS)


def applies(kind: str, x: torch.Tensor) -> bool:
    """Whether the kernels compute the ``kind`` pair on x: a float32 or bf16 (N, C, H, W) CPU
    tensor, channels-last, big enough for the pool, C a multiple of ``CHANNEL_MULTIPLE`` (the
    average: at most ``MAX_CHANNELS``); and what every kernel needs, with or without gradients
    (``kernels.may_run_with_grad``: at most ``MAX_THREADS`` torch threads, not while
    ``torch.compile`` traces, built kernels)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last) or x.numel() == 0:
        return False
    if kind == "max" and min(x.shape[2], x.shape[3]) < 2:
        return False
    if x.shape[1] % CHANNEL_MULTIPLE != 0 or (kind == "mean" and x.shape[1] > MAX_CHANNELS):
        return False
    return kernels.may_run_with_grad(x, MAX_THREADS)


def pooled_shape(kind: str, x: torch.Tensor) -> tuple[int, int, int, int]:
    """The pair's output shape for x (N, C, H, W): (N, C, H // 2, W // 2) or (N, C, 1, 1)."""
    n, c, h, w = x.shape
    return (n, c, h // 2, w // 2) if kind == "max" else (n, c, 1, 1)


def launched(kind: str, x: torch.Tensor, out: torch.Tensor, *grad: torch.Tensor) -> None:
    """Run the ``kind`` pair's kernel (``KERNELS``; its backward when given the output's
    ``grad``) on x (N, C, H, W) channels-last into ``out``, with x's dims as it takes them."""
    n, c, h, w = x.shape
    sizes = (n, h, w, c) if kind == "max" else (n, h * w, c)
    kernels.run_kernel(
        KERNELS[kind] + ("_backward" if grad else ""),
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        *sizes,
        *(t.data_ptr() for t in grad),
        out.data_ptr(),
    )


@kernels.operator("relu_pool")
def relu_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``pool(relu(x))`` for x (N, C, H, W) float32 or bf16, channels-last (``applies``): the
    2x2 max pool (``kind`` "max", channels-last out) or the global average ("mean", (N, C, 1,
    1) out) in x's dtype."""
    kernels.require(kind in ("max", "mean"), "kind max or mean")
    kernels.require(
        x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last),
        "a float32 or bf16 (N, C, H, W) input, channels-last",
    )
    out = torch.empty(pooled_shape(kind, x), dtype=x.dtype, memory_format=torch.channels_last)
    launched(kind, x, out)
    return out


@relu_pool.register_fake
def relu_pool_fake(x, kind):
    """The output's shape, dtype and layout, for tracing (``torch.library.opcheck``)."""
    shape = pooled_shape(kind, x)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@kernels.operator("relu_pool_backward")
def relu_pool_backward(x: torch.Tensor, grad: torch.Tensor, kind: str) -> torch.Tensor:
    """``relu_pool``'s gradient for x: grad (its output's shape, x's dtype) -> (N, C, H, W),
    channels-last."""
    # as the kernels read them, whatever layout a saved-tensor hook gave x back in
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    launched(kind, x, out, grad)
    return out


@relu_pool_backward.register_fake
def relu_pool_backward_fake(x, grad, kind):
    """The gradient's shape, dtype and layout, for tracing."""
    return torch.empty_like(x, memory_format=torch.channels_last)


class ReluPool(torch.autograd.Function):
    """``relu_pool`` with its gradient by the kernels (first order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.kind = kind
        return relu_pool(x, kind)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return relu_pool_backward(x, grad.to(x.dtype), ctx.kind), None


def pooled(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``pool(relu(x))`` by the kernels (``applies``), through autograd where it records."""
    if torch.is_grad_enabled() and x.requires_grad:
        return ReluPool.apply(x, kind)
    return relu_pool(x, kind)


class PooledSequential(nn.Sequential):
    """An ``nn.Sequential`` whose ReLU-pool pairs (``fusable``) run as one kernel where no hook
    is on them and the kernels apply (``applies``), as does a one-input-channel kernel
    convolution with the ReLU after it (``relu_after``; where ``single_channel.applies``) and a
    Winograd convolution with the pair after it (``pool_after``; where ``winograd.applies``
    and the pool has a pixel to write); everything else module by module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self._modules.values())
        index = 0
        while index < len(modules):
            after = pool_after(modules, index)
            if (
                after is not None
                and not hooked(*modules[index : after[0] + 1])
                and winograd.applies(modules[index], x)
                and (after[1] == "mean" or min(x.shape[2], x.shape[3]) >= 2)
            ):
                x = modules[index].kernel(x, after[1])
                index = after[0] + 1
                continue
            end = relu_after(modules, index)
            if (
                end is not None
                and not hooked(*modules[index : end + 1])
                and single_channel.applies(modules[index], x)
            ):
                x = modules[index].kernel(x, relu=True)
                index = end + 1
                continue
            kind = fusable(*modules[index : index + 2]) if index + 1 < len(modules) else None
            if kind is not None and not hooked(*modules[index : index + 2]) and applies(kind, x):
                x = pooled(x, kind)
                index += 2
            else:
                x = modules[index](x)
                index += 1
        return x


def use_kernel(model: nn.Module) -> list[str]:
    """Make each plain ``nn.Sequential`` of ``model`` holding a ``fusable`` pair, or a kernel
    convolution with a ReLU after it (``relu_after``: swap the kernel in first), a
    ``PooledSequential`` (in place: the same modules, parameters and hooks); the paths made."""
    made = []
    for path, container in model.named_modules():
        if type(container) is not nn.Sequential:
            continue
        children = list(container.children())
        pairs = zip(children, children[1:], strict=False)
        if any(fusable(a, b) for a, b in pairs) or any(
            relu_after(children, index) is not None for index in range(len(children))
        ):
            container.__class__ = PooledSequential
            made.append(path)
    return made
