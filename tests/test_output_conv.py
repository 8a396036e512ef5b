"""The generator's last convolution with gradients in C (``tadfkd.models.output_conv``,
``speed.output_conv_kernel``) computes what bf16 autocast's convolution computes: the output
and every gradient within one bf16 rounding, the same shapes, dtypes and layouts; PyTorch's
convolution runs wherever the kernels do not apply."""

import copy

import pytest
import torch
from helpers import CPU, needs_kernels
from torch import nn

from tadfkd.bench import operators
from tadfkd.bench.setting import bench_config, build_path
from tadfkd.models import kernels, output_conv
from tadfkd.models.generator import Generator

pytestmark = pytest.mark.usefixtures("one_thread")  # where the kernels apply


def activation(channels: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(5, channels, *size).bfloat16()
    return x.contiguous(memory_format=torch.channels_last)


def strides(tensor: torch.Tensor) -> list[int]:
    """The strides that place elements: those of the dims longer than one."""
    return [stride for stride, size in zip(tensor.stride(), tensor.shape, strict=True) if size > 1]


def convolved(conv: nn.Conv2d, x: torch.Tensor, by_kernel: bool) -> tuple[torch.Tensor, ...]:
    """The output and the gradients of x, the weight and the bias for a fixed weighting of the
    output, under bf16 autocast."""
    conv, x = copy.deepcopy(conv), x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        assert output_conv.applies(conv, x)
        out = output_conv.convolved(x, conv) if by_kernel else conv(x)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(2)) - 0.25
    (out.float() * weights).sum().backward()
    return out, x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad


@needs_kernels
@pytest.mark.parametrize(
    ("channels", "size", "bias"),
    [(16, (7, 28), True), (32, (9, 11), True), (48, (5, 6), False), (64, (1, 1), True)],
)
def test_the_kernels_compute_autocasts_convolution_and_its_gradients(channels, size, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(channels, 1, 3, padding=1, bias=bias)
    x = activation(channels, size)
    found = convolved(conv, x, by_kernel=True)
    expected = convolved(conv, x, by_kernel=False)
    for got, want in zip(found, expected, strict=True):
        if want is None:  # no bias
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        assert strides(got) == strides(want)
        # each value within a bf16 rounding (the sums run in another order than oneDNN's),
        # with some slack near 0 for sums that cancel
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=1 / 128, atol=scale / 1000)
    # against a float64 convolution of the same bf16 values
    weight = conv.weight.detach().bfloat16().double()
    bias = None if conv.bias is None else conv.bias.detach().bfloat16().double()
    reference = torch.nn.functional.conv2d(x.double(), weight, bias, padding=1)
    torch.testing.assert_close(found[0].double(), reference, rtol=1 / 128, atol=1 / 128)


@needs_kernels
def test_the_backward_kernel_sums_the_weights_gradient_in_float32_or_better():
    # a large spatial sum: float within a row, double across rows
    conv = nn.Conv2d(16, 1, 3, padding=1)
    x = activation(16, (64, 64))
    grad = torch.randn(5, 1, 64, 64)
    taps = output_conv.rounded(conv.weight)
    with torch.no_grad():
        _, grad_w, grad_b = output_conv.conv_one_backward(x, grad, taps)
    xd = x.double().requires_grad_()
    wd = taps.double().requires_grad_()
    bd = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (torch.nn.functional.conv2d(xd, wd, bd, padding=1) * grad.double()).sum().backward()
    torch.testing.assert_close(grad_w.double(), wd.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_b.double(), bd.grad, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_pytorchs_convolution_runs_where_the_kernels_do_not_apply(monkeypatch):
    conv = nn.Conv2d(16, 1, 3, padding=1)
    x = activation(16, (8, 8))
    with torch.autocast("cpu", torch.bfloat16):
        assert output_conv.applies(conv, x)
        with torch.no_grad():
            assert not output_conv.applies(conv, x)  # no gradients: the no-grad paths' business
        assert not output_conv.applies(conv, x.contiguous())  # NCHW
        assert not output_conv.applies(conv, x.float())
        assert not output_conv.applies(nn.Conv2d(16, 2, 3, padding=1), x)
        assert not output_conv.applies(nn.Conv2d(16, 1, 3, padding=2), x)
        assert not output_conv.applies(nn.Conv2d(16, 1, 3, padding=1, padding_mode="reflect"), x)
        assert not output_conv.applies(nn.Conv2d(24, 1, 3, padding=1), activation(24, (8, 8)))
        assert not output_conv.applies(nn.Conv2d(80, 1, 3, padding=1), activation(80, (8, 8)))
        hooked = copy.deepcopy(conv)
        hooked.register_forward_hook(lambda *args: None)
        assert not output_conv.applies(hooked, x)
        monkeypatch.setattr(torch, "get_num_threads", lambda: output_conv.MAX_THREADS + 1)
        assert not output_conv.applies(conv, x)
    assert not output_conv.applies(conv, x)  # no autocast


@needs_kernels
def test_the_generator_step_runs_the_kernels_only_when_switched_on(kernel_calls):
    torch.manual_seed(0)
    generator = Generator(nz=100, img_size=28, channels=1, width=32)
    generator = generator.to(memory_format=torch.channels_last)
    grads = {}
    for on in (False, True):
        net = copy.deepcopy(generator)
        net.output_kernel = on
        kernel_calls.clear()
        with torch.autocast("cpu", torch.bfloat16):
            images = net(torch.randn(8, 100, generator=torch.Generator().manual_seed(1)))
        images.float().mean().backward()
        assert ("conv_one_backward" in kernel_calls) == on
        grads[on] = [p.grad for p in net.parameters()]
    for got, want in zip(grads[True], grads[False], strict=True):
        scale = want.abs().max().item() + 1e-6
        torch.testing.assert_close(got, want, rtol=0, atol=scale / 16)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True])  # the generator's weight: channels-last
def test_the_operator_passes_torchs_operator_checks(channels_last):
    x = activation(16, (5, 6))
    grad = torch.randn(5, 1, 5, 6)
    weight = torch.randn(1, 16, 3, 3)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.tadfkd.conv_one_backward.default, (x, grad, weight))


@needs_kernels
def test_the_kernels_are_counted_as_the_convolution_and_backward_they_replace():
    conv, x = nn.Conv2d(16, 1, 3, padding=1), activation(16, (7, 9))
    counts = {}
    for by_kernel in (True, False):
        # the operator recorder's formulas (FlopCounterMode's global module hooks make the
        # kernels stand aside, as any hook does)
        calls = operators.record(lambda: convolved(conv, x, by_kernel))  # noqa: B023
        names = {call.name for call in calls}
        assert ("tadfkd.conv_one_backward.default" in names) == by_kernel
        counts[by_kernel] = sum(call.flops for call in calls)
    forward = 2 * 5 * 7 * 9 * 16 * 9
    assert counts[True] == counts[False] == 3 * forward  # the forward, x's and the weight's


@needs_kernels
def test_the_builder_turns_the_kernels_on_on_a_cpu_and_off_on_the_published_path():
    from tadfkd.bench.published import PUBLISHED_STYLE

    assert build_path(bench_config([]), CPU, False, seed=0).synthesizer.generator.output_kernel
    off = build_path(bench_config(["speed.output_conv_kernel=false"]), CPU, False, seed=0)
    assert not off.synthesizer.generator.output_kernel
    assert "speed.output_conv_kernel=false" in PUBLISHED_STYLE


def test_where_the_kernels_do_not_build_auto_is_off_and_true_is_an_error(monkeypatch):
    from tadfkd.base.errors import UserError

    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no C compiler (cc) on the PATH")
    path = build_path(bench_config([]), CPU, False, seed=0)
    assert not path.synthesizer.generator.output_kernel
    with pytest.raises(UserError, match=r"speed.output_conv_kernel=true needs the C kernels"):
        build_path(bench_config(["speed.output_conv_kernel=true"]), CPU, False, seed=0)
