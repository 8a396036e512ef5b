"""BatchNorm in training by the C kernels (``tadfkd.models.batchnorm``,
``speed.batch_norm_kernel``) computes what ``nn.BatchNorm2d`` computes: the output, the running
statistics and every gradient to float rounding in float32, within bf16 rounding in bf16;
evaluation, other layouts and dtypes run PyTorch's. Each comparison checks that the kernels
ran."""

import copy

import pytest
import torch
from helpers import needs_kernels, networks_holding
from torch import nn

from tadfkd.bench.published import PUBLISHED_STYLE
from tadfkd.models import batchnorm
from tadfkd.models.batchnorm import KernelBatchNorm2d

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_kernels]


def pair(channels: int, eps: float = 1e-5) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    """A BatchNorm2d with random parameters and statistics, and a copy run by the kernels."""
    torch.manual_seed(1)
    norm = nn.BatchNorm2d(channels, eps=eps)
    for tensor in (norm.weight, norm.bias, norm.running_mean):
        tensor.data.normal_()
    norm.running_var.data.uniform_(0.5, 2.0)
    fast = copy.deepcopy(norm)
    assert batchnorm.use_kernel(fast) == [""]
    return norm, fast


def trained(norm: nn.BatchNorm2d, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """norm(x) in training, x's, the weight's and the bias's gradients, and the statistics."""
    norm.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    out = norm(leaf)
    out.backward(grad)
    statistics = [norm.running_mean, norm.running_var, norm.num_batches_tracked]
    return [out.detach(), leaf.grad, norm.weight.grad, norm.bias.grad, *statistics]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, eps",
    # the student's and the generator's layers; channels that fill no vector; a large mean
    [
        ((64, 8, 14, 14), 1e-5),
        ((8, 16, 28, 28), 0.8),
        ((3, 24, 5, 7), 1e-5),
        ((2, 64, 3, 3), 0.8),
        # wider than a span of 64 values: one pixel a span (the published generator's 128)
        ((3, 65, 3, 3), 1e-5),
        ((4, 128, 4, 4), 0.8),
    ],
)
def test_the_kernels_compute_batchnorms_output_statistics_and_gradients(
    dtype, shape, eps, kernel_calls
):
    """Against BatchNorm in float64 on the same inputs (PyTorch's float32 BatchNorm is further
    from it, its weight gradient 1e-2 of a 200 off where the kernel's is 1e-4)."""
    norm, fast = pair(shape[1], eps)
    torch.manual_seed(2)
    x = (torch.randn(shape) * 3 + 50).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    found = trained(fast, x, grad)
    assert kernel_calls == ["batch_norm_train", "batch_norm_train_backward"]
    expected = trained(copy.deepcopy(norm).double(), x.double(), grad.double())
    assert found[0].dtype == dtype and found[0].is_contiguous(memory_format=torch.channels_last)
    names = ["output", "input gradient", "weight gradient", "bias gradient", "mean", "variance"]
    for name, a, b in zip(names, found, expected, strict=False):
        # the output and input gradient rounded to x's dtype; the sums in float32
        rounded = dtype == torch.bfloat16 and name in ("output", "input gradient")
        rtol, atol = (1e-2, 1e-2) if rounded else (1e-5, 1e-4)
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=name)
    assert found[-1] == expected[-1] == 1  # num_batches_tracked


def test_the_operators_read_any_layout_and_the_backward_a_saved_tensor_in_another(kernel_calls):
    norm, fast = pair(16)
    x = torch.randn(4, 16, 5, 3).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    expected = trained(fast, x, grad)
    # a saved-tensor hook that gives x back in NCHW (as offloading hooks may)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t):
        found = trained(fast, x, grad)
    for a, b in zip(found[:4], expected[:4], strict=True):
        torch.testing.assert_close(a, b)
    arguments = (torch.rand(16), torch.rand(16), torch.zeros(16), torch.ones(16), 0.1, 1e-5)
    nchw = torch.ops.tadfkd.batch_norm_train(x.contiguous(), *arguments)
    for a, b in zip(nchw, torch.ops.tadfkd.batch_norm_train(x, *arguments), strict=True):
        torch.testing.assert_close(a, b)
    assert kernel_calls.count("batch_norm_train_backward") == 2


def test_the_operators_refuse_per_channel_tensors_and_gradients_of_other_shapes(kernel_calls):
    x = torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    full, short = torch.ones(16), torch.ones(8)
    with pytest.raises(RuntimeError, match="one value a channel"):  # C values would be written
        batchnorm.batch_norm_train(x, full, full, short, short.clone(), 0.1, 1e-5)
    out, mean, invstd = batchnorm.batch_norm_train(
        x, full, full, full.clone(), full.clone(), 0.1, 1e-5
    )
    with pytest.raises(RuntimeError, match="the output's shape"):
        batchnorm.batch_norm_train_backward(x, out[:, :, :1, :1], full, mean, invstd)
    with torch.no_grad():  # a meta tensor goes to the fake implementation, not to the kernel
        meta = batchnorm.batch_norm_train(
            x.to("meta"), *(t.to("meta") for t in (full,) * 4), 0.1, 1e-5
        )
    assert meta[0].device.type == "meta" and kernel_calls == ["batch_norm_train"]


def test_evaluation_other_layouts_and_dtypes_run_pytorchs_batchnorm(kernel_calls):
    norm, fast = pair(16)
    x = torch.randn(4, 16, 6, 6)
    for inputs in (x, x.double().contiguous(memory_format=torch.channels_last)):  # NCHW; float64
        torch.testing.assert_close(fast.double()(inputs.double()), norm.double()(inputs.double()))
        fast.float(), norm.float()
    fast.eval(), norm.eval()
    x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), norm(x))
    cumulative = copy.deepcopy(fast).train()
    cumulative.momentum = None  # a cumulative average: not eligible
    cumulative(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(batchnorm.MAX_THREADS + 1)
        fast.train()(x)
    finally:
        torch.set_num_threads(threads)
    assert kernel_calls == []


def test_the_swap_keeps_parameters_state_dict_keys_and_hooks(kernel_calls):
    norm, fast = pair(8)
    assert list(fast.state_dict()) == list(norm.state_dict())
    assert type(fast) is KernelBatchNorm2d and fast.weight is not norm.weight
    seen = []
    fast.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    fast(torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last))
    assert seen == [(2, 8, 3, 3)] and kernel_calls == ["batch_norm_train"]


@pytest.mark.parametrize("setting", [["experiment=fashion_mnist"], []])
def test_the_builder_swaps_the_students_and_the_generators_batchnorms(setting):
    def made(*more: str) -> list[str]:
        return networks_holding(KernelBatchNorm2d, [*setting, *more])

    assert made() == ["student", "generator"]  # auto; the teacher trains no BatchNorm
    for off in ("speed.batch_norm_kernel=false", "speed.channels_last=false", "speed.compile=true"):
        assert made(off) == [], off
    assert made(*PUBLISHED_STYLE) == []  # the benchmark's published-style path


def test_the_operators_trace_with_their_fake_implementations():
    x = torch.randn(2, 16, 4, 5).bfloat16().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(16), torch.rand(16)
    arguments = (x, weight, bias, torch.zeros(16), torch.ones(16), 0.1, 1e-5)
    found = torch.library.opcheck(torch.ops.tadfkd.batch_norm_train.default, arguments)
    assert set(found.values()) == {"SUCCESS"}
    out, mean, invstd = torch.ops.tadfkd.batch_norm_train(*arguments)
    arguments = (x, torch.randn_like(out), weight, mean, invstd)
    found = torch.library.opcheck(torch.ops.tadfkd.batch_norm_train_backward.default, arguments)
    assert set(found.values()) == {"SUCCESS"}
