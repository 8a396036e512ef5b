"""The one-input-channel convolution kernel (``tadfkd.models.single_channel``,
``speed.single_channel_conv``, ``speed.single_channel_training``) computes what PyTorch's
convolution computes: float32 to float rounding, under bf16 autocast within one bf16 rounding;
it runs in the folded teacher's no-grad CPU forwards, and in the student's and the generator
step's teacher's under bf16 autocast, with gradients too (PyTorch's backward), at one thread;
PyTorch's convolution runs wherever it does not apply. Each comparison checks that the kernel
ran."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU, needs_kernels
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.base.errors import UserError
from tadfkd.bench import operators
from tadfkd.bench.setting import bench_config, build_path
from tadfkd.models import kernels, single_channel
from tadfkd.models.single_channel import SingleChannelConv2d
from tadfkd.run.builder import use_kernels

pytestmark = pytest.mark.usefixtures("one_thread")  # where the kernels apply


def swapped(conv: nn.Conv2d) -> nn.Module:
    """A copy of ``conv`` with the kernel swapped in."""
    model = nn.Sequential(copy.deepcopy(conv))
    assert single_channel.use_kernel(model) == ["0"]
    return model[0]


def batch(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(shape)


def float64_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, conv.stride, conv.padding)


@needs_kernels
@pytest.mark.parametrize(
    ("channels", "size", "stride", "padding"),
    [
        (16, 3, 2, 1),
        (32, 3, 1, 1),
        (48, 5, 2, 2),
        (64, 3, 1, 0),
        (16, 7, 3, 3),
        (32, 1, 1, 0),
        (8, 3, 2, 1),
        (8, 5, 1, 2),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_the_kernel_is_pytorchs_convolution_in_float32(
    channels, size, stride, padding, bias, kernel_calls
):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, channels, size, stride=stride, padding=padding, bias=bias)
    fast = swapped(conv.to(memory_format=torch.channels_last))
    x = batch((5, 1, 13, 11))  # odd sizes: a partial block of outputs at each row's end
    with torch.no_grad():
        out = fast(x)
    assert kernel_calls == ["single_channel_conv"]
    expected = float64_conv(conv, x)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_kernel_reads_strided_inputs_and_weights(kernel_calls):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 32, 3, stride=2, padding=1)
    conv.weight = nn.Parameter(conv.weight.detach().transpose(2, 3))  # strides (9, 9, 1, 3)
    fast = swapped(conv)
    images = batch((4, 3, 12, 10))
    with torch.no_grad():
        for x in (images[:, 1:2], images[:, :1].transpose(2, 3)):  # a channel; H and W swapped
            torch.testing.assert_close(
                fast(x).double(), float64_conv(conv, x), rtol=1e-5, atol=1e-5
            )
    assert kernel_calls == ["single_channel_conv"] * 2


@needs_kernels
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("channels", "size", "bias"),
    [(16, 3, True), (32, 3, True), (48, 5, False), (64, 3, True), (8, 3, False), (8, 3, True)],
)
def test_under_bf16_autocast_the_kernel_rounds_as_autocast_does(
    input_dtype, channels, size, bias, kernel_calls
):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, channels, size, stride=2, padding=size // 2, bias=bias)
    conv = conv.to(memory_format=torch.channels_last)
    fast = swapped(conv)
    x = batch((6, 1, 28, 28)).to(input_dtype)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out, expected = fast(x), conv(x)
    assert kernel_calls == ["single_channel_conv"]
    assert out.dtype == expected.dtype == torch.bfloat16
    # each output is the same float32 sum of the rounded inputs, rounded once: equal but for
    # the order of the sums (oneDNN's may differ), so within one bf16 rounding
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-6)
    assert (out == expected).float().mean() > 0.99


@needs_kernels
def test_with_gradients_or_another_dtype_pytorchs_convolution_runs(kernel_calls):
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
        torch.set_num_threads(single_channel.MAX_THREADS + 1)  # PyTorch's parallel one
        assert not single_channel.applies(fast, x)
        torch.set_num_threads(1)
        bf16_bias = swapped(nn.Conv2d(1, 16, 3, padding=1))
        bf16_bias.bias = nn.Parameter(bf16_bias.bias.detach().bfloat16())
        assert not single_channel.applies(bf16_bias, x)
    assert not single_channel.applies(fast, x)  # gradients
    x.requires_grad_()
    fast(x).sum().backward()
    assert x.grad is not None and fast.weight.grad is not None
    assert kernel_calls == []


def test_only_plain_convolutions_of_one_input_channel_and_8_or_16_to_64_outputs_are_swapped():
    hooked = nn.Conv2d(1, 16, 3, padding=1)
    hooked.register_forward_hook(lambda *args: None)  # a swap would lose it
    shared = nn.Conv2d(1, 32, 3, padding=1)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # swapped
        nn.Conv2d(16, 16, 3, padding=1),  # sixteen inputs
        nn.Conv2d(1, 24, 3, padding=1),  # twenty-four outputs
        nn.Conv2d(1, 16, 3, padding=1, dilation=2),
        nn.Conv2d(1, 16, 3, padding="same"),
        nn.Conv2d(1, 16, 9, padding=4),  # larger than the kernel's 7 x 7
        nn.Conv2d(1, 16, 3, padding=1, padding_mode="reflect"),
        nn.Sequential(nn.Conv2d(1, 64, 3, stride=2)),  # swapped, nested
        hooked,
        nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 16, 3, padding=1)),  # computed
        shared,  # swapped at both of its paths, as one module
        nn.Sequential(shared),
    )
    state = copy.deepcopy(model.state_dict())
    assert single_channel.use_kernel(model) == ["0", "7.0", "10", "11.0"]  # not "2"
    assert type(model[1]) is nn.Conv2d and type(model[2]) is nn.Conv2d and model[8] is hooked
    assert model[10] is model[11][0] and isinstance(model[10], SingleChannelConv2d)
    # the same parameters under the same names
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


@needs_kernels
def test_the_kernel_is_counted_as_the_convolution_it_replaces(kernel_calls):
    conv = nn.Conv2d(1, 32, 3, stride=2, padding=1)
    fast, x = swapped(conv), batch((4, 1, 16, 16))
    counts = []
    for module in (conv, fast):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert kernel_calls == ["single_channel_conv"]
    assert counts[0] == counts[1] > 0


@needs_kernels
def test_under_torch_compile_pytorchs_convolution_is_compiled(kernel_calls):
    conv = nn.Conv2d(1, 16, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
    fast, x = swapped(conv), batch((4, 1, 12, 12))
    compiled = torch.compile(fast, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x)
    assert kernel_calls == []  # as speed.compile=true leaves the kernel out of a run
    torch.testing.assert_close(out.double(), float64_conv(conv, x), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels", [8, 16])
def test_the_operator_passes_torchs_operator_checks(bf16, relu, channels):
    x, weight = batch((3, 1, 9, 8)), torch.randn(channels, 1, 3, 3)
    bias = torch.randn(channels)
    found = torch.library.opcheck(
        torch.ops.tadfkd.single_channel_conv.default, (x, weight, bias, 2, 1, bf16, relu)
    )
    assert set(found.values()) == {"SUCCESS"}  # its schema and its fake implementation


@needs_kernels
def test_the_operator_split_rates_the_kernel_at_the_precision_it_computes_in(kernel_calls):
    fast, x = swapped(nn.Conv2d(1, 16, 3, padding=1)), batch((4, 1, 8, 8))
    for autocast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            calls = operators.record(lambda: fast(x))  # a float32 input either way
        (call,) = [c for c in calls if c.name == "tadfkd.single_channel_conv.default"]
        assert call.dtype == dtype and call.flops > 0


@needs_kernels
@pytest.mark.parametrize(
    ("weight", "bias", "stride", "says"),
    [
        ((16, 1, 3, 5), None, 1, "a weight \\(C, 1, K, K\\)"),
        ((16, 2, 3, 3), None, 1, "a weight \\(C, 1, K, K\\)"),
        ((24, 1, 3, 3), None, 1, "16 to 64 outputs"),
        ((16, 1, 3, 3), (8,), 1, "a bias \\(C,\\)"),
        ((16, 1, 3, 3), None, 0, "stride"),
    ],
)
def test_the_operator_refuses_what_the_kernel_cannot_compute_in_one_error(
    weight, bias, stride, says
):
    bias_tensor = None if bias is None else torch.zeros(bias)
    with pytest.raises(RuntimeError, match=says):
        torch.ops.tadfkd.single_channel_conv(
            batch((2, 1, 5, 5)), torch.randn(weight), bias_tensor, stride, 1, False, False
        )
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.tadfkd.single_channel_conv(
            batch((2, 1, 5, 5)).bfloat16(), torch.randn(16, 1, 3, 3), None, 1, 1, False, False
        )


@needs_kernels
@pytest.mark.parametrize("setting", ["fashion_mnist", "small"])
def test_the_builder_swaps_the_kernel_into_each_first_layer_it_takes(setting, kernel_calls):
    overrides = {"fashion_mnist": ["experiment=fashion_mnist"], "small": []}[setting]
    size = 28 if setting == "fashion_mnist" else 16

    def distiller(*more: str):
        return build_path(bench_config([*overrides, *more]), CPU, published=False, seed=0)

    def kernel_paths(model: nn.Module) -> list[str]:
        return [path for path, m in model.named_modules() if isinstance(m, SingleChannelConv2d)]

    kernel_calls.clear()
    default = distiller()
    assert kernel_paths(default.inference_teacher) == ["features.0"]  # auto
    assert [kernel_paths(m) for m in (default.teacher, default.student)] == [[], []]  # false
    training = "speed.single_channel_training=auto"
    built, plain = distiller(training), distiller(training, "speed.single_channel_conv=false")
    # the generator step's teacher and the student: under bf16 autocast
    for model in (built.teacher, built.student):
        assert kernel_paths(model) == ["features.0"] and model.features[0].bf16_only
    assert not built.inference_teacher.features[0].bf16_only
    unfolded = distiller(training, "speed.fold_teacher_bn=false")
    assert unfolded.inference_teacher is unfolded.teacher  # swapped as the teacher: bf16 only
    with torch.no_grad():
        unfolded.inference_teacher(batch((2, 1, size, size)))  # the scoring's float32 forward
    assert "single_channel_conv" not in kernel_calls
    assert kernel_paths(plain.teacher) == ["features.0"]  # the other switch: the folded one's
    for off in ("speed.channels_last=false", "speed.compile=true"):
        found = distiller(training, off)
        networks = (found.inference_teacher, found.teacher, found.student)
        assert [kernel_paths(m) for m in networks] == [[], [], []], off
    # the folded teacher's logits as without the kernel, to float rounding
    x = batch((8, 1, size, size)).contiguous(memory_format=torch.channels_last)
    kernel_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(
            built.inference_teacher(x), plain.inference_teacher(x), rtol=1e-5, atol=1e-5
        )
    assert kernel_calls.count("single_channel_conv") == 1  # the ReLU-pool kernels ran in both


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


def bf16_swap(channels: int, stride: int) -> tuple[nn.Conv2d, nn.Module]:
    """A convolution (1 -> ``channels``, 3x3, no bias, channels-last) and a copy swapped as the
    builder swaps the student's (``use_kernel``, ``bf16_only``)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, channels, 3, stride=stride, padding=1, bias=False)
    conv = conv.to(memory_format=torch.channels_last)
    model = nn.Sequential(copy.deepcopy(conv))
    assert single_channel.use_kernel(model, bf16_only=True) == ["0"]
    return conv, model[0]


def autocast_step(module: nn.Module, x: torch.Tensor, wants: tuple[bool, bool]) -> list:
    """Output, x's and the weight's gradients (None: not wanted) of a bf16-autocast forward
    and a backward of a fixed output gradient, and the FLOPs counted."""
    x = x.detach().clone().requires_grad_(wants[0])
    module.weight.requires_grad_(wants[1])
    module.weight.grad = None
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", torch.bfloat16):
            out = module(x)
        torch.manual_seed(7)
        out.backward(torch.randn_like(out))
    return [out.detach(), x.grad, module.weight.grad, counter.get_total_flops()]


@needs_kernels
@pytest.mark.parametrize(("channels", "stride"), [(8, 2), (16, 2), (32, 1)])
@pytest.mark.parametrize("wants", [(False, True), (True, False), (True, True)])
def test_with_gradients_the_kernels_forward_is_autocasts_convolution_to_bf16_rounding(
    channels, stride, wants, kernel_calls
):
    """The student step (the weight's gradient), the generator step (the input's), both."""
    conv, fast = bf16_swap(channels, stride)
    x = batch((6, 1, 28, 28))
    found, expected = autocast_step(fast, x, wants), autocast_step(conv, x, wants)
    assert kernel_calls == ["single_channel_conv"]
    out, want = found[0], expected[0]
    assert out.dtype == want.dtype == torch.bfloat16 and out.stride() == want.stride()
    torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=1e-6)  # one step
    assert (out == want).float().mean() > 0.999  # the same sums, in oneDNN's order but rarely
    for got, wanted in zip(found[1:3], expected[1:3], strict=True):  # PyTorch's backward
        assert (got is None and wanted is None) or torch.equal(got, wanted)
    assert found[3] == expected[3] > 0  # the same FLOPs: the kernel's and the backward's


@needs_kernels
def test_a_bf16_only_module_runs_pytorchs_convolution_outside_bf16_autocast(kernel_calls):
    conv, fast = bf16_swap(16, 2)
    x = batch((4, 1, 28, 28))
    with torch.no_grad():
        assert torch.equal(fast(x), conv(x))  # float32: oneDNN's own roundings
        assert kernel_calls == []
        with torch.autocast("cpu", torch.bfloat16):
            fast(x)
    assert kernel_calls == ["single_channel_conv"]
    fast(x).sum().backward()  # gradients without autocast: PyTorch's
    assert kernel_calls == ["single_channel_conv"]


@needs_kernels
def test_with_gradients_only_a_bf16_only_module_without_bias_runs_the_kernel(kernel_calls):
    x = batch((4, 1, 16, 16)).requires_grad_()
    folded = swapped(nn.Conv2d(1, 16, 3, padding=1, bias=False))  # the folded teacher's way
    biased = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1).to(memory_format=torch.channels_last))
    nchw = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False))  # PyTorch's out: NCHW
    for model in (biased, nchw):
        assert single_channel.use_kernel(model, bf16_only=True) == ["0"]
    with torch.autocast("cpu", torch.bfloat16):
        for module in (folded, biased[0], nchw[0]):
            module(x).float().sum().backward()
    assert kernel_calls == [] and x.grad is not None
