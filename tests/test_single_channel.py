"""The one-input-channel convolution kernel (``tadfkd.models.single_channel``,
``speed.single_channel_conv``) computes what PyTorch's convolution computes: float32 to float
rounding, under bf16 autocast within one bf16 rounding; it runs only in the folded teacher's
no-grad CPU forwards, and PyTorch's convolution runs wherever it does not apply."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.base.errors import UserError
from tadfkd.bench.setting import bench_config, build_path
from tadfkd.models import kernels, single_channel
from tadfkd.models.single_channel import SingleChannelConv2d
from tadfkd.run.builder import use_kernels

needs_kernels = pytest.mark.skipif(
    kernels.kernels() is None, reason=f"the kernels did not build: {kernels.unavailable_reason()}"
)


@pytest.fixture(autouse=True)
def one_thread():
    """The kernel runs at one torch thread (``MAX_THREADS``); conftest restores the count."""
    torch.set_num_threads(1)


def swapped(conv: nn.Conv2d) -> nn.Module:
    """A copy of ``conv`` (in a container) with the kernel swapped in, and its paths."""
    model = nn.Sequential(copy.deepcopy(conv))
    assert single_channel.use_kernel(model) == ["0"]
    return model[0]


def batch(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(shape)


@needs_kernels
@pytest.mark.parametrize(
    ("channels", "size", "stride", "padding"),
    [(16, 3, 2, 1), (32, 3, 1, 1), (48, 5, 2, 2), (64, 3, 1, 0), (16, 7, 3, 3), (32, 1, 1, 0)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_the_kernel_is_pytorchs_convolution_in_float32(channels, size, stride, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, channels, size, stride=stride, padding=padding, bias=bias)
    conv = conv.to(memory_format=torch.channels_last)
    fast = swapped(conv)
    x = batch((5, 1, 13, 11))  # odd sizes: a partial block of outputs at each row's end
    with torch.no_grad():
        assert single_channel.applies(fast, x)
        out = fast(x)
        expected = F.conv2d(x.double(), conv.weight.double(), None, stride, padding)
        if bias:
            expected = expected + conv.bias.double().view(1, -1, 1, 1)
    assert isinstance(fast, SingleChannelConv2d)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [16, 32])
def test_under_bf16_autocast_the_kernel_rounds_as_autocast_does(input_dtype, channels):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, channels, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
    fast = swapped(conv)
    x = batch((6, 1, 28, 28)).to(input_dtype)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert single_channel.applies(fast, x)
        out, expected = fast(x), conv(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    # each output is the same float32 sum of the rounded inputs, rounded once: equal but for
    # the order of the sums (oneDNN's may differ), so within one bf16 rounding
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-8, atol=1e-6)
    assert (out == expected).float().mean() > 0.99


@needs_kernels
def test_with_gradients_or_another_dtype_pytorchs_convolution_runs():
    fast, x = swapped(nn.Conv2d(1, 16, 3, padding=1)), batch((4, 1, 8, 8))
    with torch.no_grad():
        assert single_channel.applies(fast, x)
        assert not single_channel.applies(fast, x[:0])  # no sample
        with torch.autocast("cpu", torch.bfloat16):
            assert single_channel.applies(fast, x)
        with torch.autocast("cpu", torch.float16):
            assert not single_channel.applies(fast, x)
        assert not single_channel.applies(fast, x.bfloat16())  # bf16 without autocast
        assert not single_channel.applies(fast, x.double())
        threads = torch.get_num_threads()
        torch.set_num_threads(single_channel.MAX_THREADS + 1)  # PyTorch's parallel one
        try:
            assert not single_channel.applies(fast, x)
        finally:
            torch.set_num_threads(threads)
    assert not single_channel.applies(fast, x)  # gradients
    x.requires_grad_()
    fast(x).sum().backward()
    assert x.grad is not None and fast.weight.grad is not None


def test_only_plain_convolutions_of_one_input_channel_and_16_to_64_outputs_are_swapped():
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # swapped
        nn.Conv2d(16, 16, 3, padding=1),  # sixteen inputs
        nn.Conv2d(1, 8, 3, padding=1),  # eight outputs
        nn.Conv2d(1, 16, 3, padding=1, dilation=2),
        nn.Conv2d(1, 16, 3, padding="same"),
        nn.Conv2d(1, 16, 9, padding=4),  # larger than the kernel's 7 x 7
        nn.Conv2d(1, 16, 3, padding=1, padding_mode="reflect"),
        nn.Sequential(nn.Conv2d(1, 64, 3, stride=2)),  # swapped, nested
    )
    state = copy.deepcopy(model.state_dict())
    assert single_channel.use_kernel(model) == ["0", "7.0"]
    assert type(model[1]) is nn.Conv2d and type(model[2]) is nn.Conv2d
    # the same parameters under the same names
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


@needs_kernels
def test_the_kernel_is_counted_as_the_convolution_it_replaces():
    conv = nn.Conv2d(1, 32, 3, stride=2, padding=1)
    fast, x = swapped(conv), batch((4, 1, 16, 16))
    with torch.no_grad():
        assert single_channel.applies(fast, x)
    counts = []
    for module in (conv, fast):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@needs_kernels
def test_the_kernel_refuses_a_bf16_input_without_bf16_in_one_error():
    weight = torch.randn(16, 1, 3, 3)
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.tadfkd.single_channel_conv(
            batch((2, 1, 5, 5)).bfloat16(), weight, None, 1, 1, False
        )


@needs_kernels
@pytest.mark.parametrize("setting", ["fashion_mnist", "small"])
def test_the_builder_swaps_the_kernel_into_the_folded_teacher_only(setting):
    overrides = {"fashion_mnist": ["experiment=fashion_mnist"], "small": []}[setting]

    def distiller(*more: str):
        return build_path(bench_config([*overrides, *more]), CPU, published=False, seed=0)

    def kernel_paths(model: nn.Module) -> list[str]:
        return [path for path, m in model.named_modules() if isinstance(m, SingleChannelConv2d)]

    built = distiller()
    assert kernel_paths(built.inference_teacher) == ["features.0"]  # auto
    assert kernel_paths(built.teacher) == []  # the generator step's teacher: PyTorch's
    for off in (
        "speed.single_channel_conv=false",
        "speed.fold_teacher_bn=false",
        "speed.channels_last=false",
        "speed.compile=true",
    ):
        assert kernel_paths(distiller(off).inference_teacher) == [], off
    # the folded teacher's logits as without the kernel, to float rounding
    plain = distiller("speed.single_channel_conv=false").inference_teacher
    size = 28 if setting == "fashion_mnist" else 16
    x = batch((8, 1, size, size)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert single_channel.applies(built.inference_teacher.features[0], x)
        torch.testing.assert_close(built.inference_teacher(x), plain(x), rtol=1e-5, atol=1e-5)


def test_where_the_kernels_do_not_build_auto_runs_pytorchs_convolution(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no C compiler (cc) on the PATH")
    key = "speed.single_channel_conv"
    assert use_kernels(key, "auto", True) is False
    with pytest.raises(UserError, match=r"speed.single_channel_conv=true needs .* \(no C comp"):
        use_kernels(key, True, True)
    assert use_kernels(key, True, False) is False  # nothing to do: no error
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: None)
    assert use_kernels(key, "auto", True) is True
    assert use_kernels(key, False, True) is False
