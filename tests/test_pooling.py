"""The fused ReLU-pool kernels (``tadfkd.models.pooling``, ``speed.fused_pooling``) compute
what PyTorch's ReLU and pooling compute: the max pool and every gradient bit for bit (ties and
NaNs picked as PyTorch picks them), the average to float rounding; a pair with a hook on it,
or where the kernels do not apply, runs module by module. Each comparison checks that the
kernels ran."""

import copy

import pytest
import torch
from helpers import needs_kernels, networks_holding
from torch import nn

from tadfkd.bench import operators
from tadfkd.bench.published import PUBLISHED_STYLE
from tadfkd.bench.setting import SETTINGS, bench_config, build_path
from tadfkd.distillation.objectives import stage_ends
from tadfkd.models import pooling, single_channel
from tadfkd.models.digits import digits_cnn
from tadfkd.models.pooling import PooledSequential

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_kernels]

POOLS = {"max": lambda: nn.MaxPool2d(2), "mean": lambda: nn.AdaptiveAvgPool2d(1)}


def awkward_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random values, channels-last, with a window of ties, one of zeros and a NaN."""
    torch.manual_seed(3)
    x = torch.randn(shape).to(dtype)
    x[0, :, :2, :2] = 0.5  # a tie: the first largest gets the gradient
    x[1, :, :2, :2] = 0.0  # all zero: no gradient
    x[-1, 0, -2, -2] = float("nan")
    x[-1, -1, 0, 0] = x[-1, -1, 1, 1] = float("nan")  # two in a window: the last is picked
    return x.contiguous(memory_format=torch.channels_last)


def relu_pooled(kind: str, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's output and x's gradient for a fixed output gradient, by the kernels or by
    PyTorch's modules."""
    x = x.detach().clone().requires_grad_()
    out = pooling.pooled(x, kind) if fused else POOLS[kind]()(torch.relu(x))
    torch.manual_seed(4)
    out.backward(torch.randn_like(out))
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 16, 14, 14), (3, 5, 7, 9), (2, 64, 7, 7)])
def test_the_fused_max_pool_and_its_gradient_are_pytorchs_bit_for_bit(dtype, shape, kernel_calls):
    x = awkward_batch(shape, dtype)
    out, grad = relu_pooled("max", x, fused=True)
    assert kernel_calls == ["relu_max_pool", "relu_max_pool_backward"]
    expected, expected_grad = relu_pooled("max", x, fused=False)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0, equal_nan=True)
    assert out.isnan().sum() == 2  # the NaNs' windows
    if shape[2] % 2:  # the row no window covers: no gradient
        assert not grad[:, :, -1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 16, 14, 14), (3, 5, 7, 9), (2, 64, 7, 7)])
def test_the_fused_average_is_pytorchs_to_rounding_and_its_gradient_exact(
    dtype, shape, kernel_calls
):
    x = awkward_batch(shape, dtype)
    out, grad = relu_pooled("mean", x, fused=True)
    assert kernel_calls == ["relu_mean", "relu_mean_backward"]
    expected, expected_grad = relu_pooled("mean", x, fused=False)
    assert out.shape == (shape[0], shape[1], 1, 1) and out.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3  # one bf16 rounding
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance, equal_nan=True)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0, equal_nan=True)


def test_the_kernels_run_without_gradients_and_under_autocast(kernel_calls):
    model = PooledSequential(nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    x = awkward_batch((3, 16, 8, 8), torch.float32)
    with torch.no_grad():
        out = model(x)
        with torch.autocast("cpu", torch.bfloat16):
            out_bf16 = model(x.bfloat16())
    assert kernel_calls == ["relu_max_pool", "relu_mean"] * 2
    plain = nn.Sequential(*model)
    torch.testing.assert_close(out, plain(x), equal_nan=True)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16, plain(x.bfloat16()), rtol=8e-3, atol=8e-3, equal_nan=True)


@pytest.mark.parametrize(
    ("relu", "pool", "kind"),
    [
        (nn.ReLU(), nn.MaxPool2d(2), "max"),
        (nn.ReLU(), nn.MaxPool2d((2, 2), stride=2), "max"),
        (nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), "mean"),
        (nn.ReLU(inplace=True), nn.MaxPool2d(2), None),
        (nn.ReLU(), nn.MaxPool2d(3), None),
        (nn.ReLU(), nn.MaxPool2d(2, stride=1), None),
        (nn.ReLU(), nn.MaxPool2d(2, padding=1), None),
        (nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), None),
        (nn.ReLU(), nn.AdaptiveAvgPool2d(2), None),
        (nn.LeakyReLU(), nn.MaxPool2d(2), None),
        (nn.ReLU(), nn.AvgPool2d(2), None),
    ],
)
def test_only_plain_relu_pool_pairs_are_fused(relu, pool, kind):
    assert pooling.fusable(relu, pool) == kind


def test_a_hooked_pair_and_an_inapplicable_input_run_module_by_module(kernel_calls):
    model = PooledSequential(nn.ReLU(), nn.MaxPool2d(2))
    seen = []
    handle = model[0].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    x = awkward_batch((2, 16, 8, 8), torch.float32)
    with torch.no_grad():
        model(x)
        assert seen == [(2, 16, 8, 8)] and kernel_calls == []  # the ReLU's output was seen
        handle.remove()
        model(x.contiguous())  # NCHW
        model(x.double())
        assert kernel_calls == []
        with torch.nn.modules.module.register_module_forward_hook(lambda *_: None):
            model(x)
        assert kernel_calls == []
        model(x)
    assert kernel_calls == ["relu_max_pool"]


def test_beyond_two_threads_or_the_channels_the_kernels_take_the_pairs_run_as_two_modules(
    kernel_calls,
):
    model = PooledSequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    wide = awkward_batch((2, pooling.MAX_CHANNELS + 16, 2, 2), torch.float32).nan_to_num()
    for channels in (8, 24):  # not a multiple of 16: the kernels' slow remainder loops
        narrow = awkward_batch((2, channels, 4, 4), torch.bfloat16).nan_to_num()
        for pair in (model, PooledSequential(nn.ReLU(), nn.MaxPool2d(2))):
            torch.testing.assert_close(pair(narrow), nn.Sequential(*pair)(narrow))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(pooling.MAX_THREADS + 1)
        model(awkward_batch((2, 16, 4, 4), torch.float32))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(model(wide), nn.Sequential(*model)(wide))
    assert kernel_calls == []
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.tadfkd.relu_pool(wide.contiguous(), "mean")  # NCHW: refused, not misread


def test_use_kernel_changes_only_the_containers_class(kernel_calls):
    torch.manual_seed(0)
    model = digits_cnn(10).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model)
    assert pooling.use_kernel(model) == ["features"]
    assert pooling.use_kernel(model) == []  # already made
    assert type(model.features) is PooledSequential
    assert list(model.state_dict()) == list(plain.state_dict())
    x = awkward_batch((4, 1, 16, 16), torch.float32).nan_to_num()
    for network in (model, plain):
        network(x).square().sum().backward()
    assert kernel_calls == ["relu_max_pool", "relu_mean", "relu_mean_backward"] + [
        "relu_max_pool_backward"
    ]
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_zskts_stage_hooks_see_the_relu_outputs_they_saw_before(kernel_calls):
    """ZSKT hooks every module for its stage ends: the pairs then run as two modules."""
    model = digits_cnn(10).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model)
    pooling.use_kernel(model)
    stages, plain_stages = stage_ends(model), stage_ends(plain)
    x = awkward_batch((4, 1, 16, 16), torch.float32).nan_to_num()
    with torch.no_grad():
        model(x), plain(x)
    found, expected = stages.take(), plain_stages.take()
    assert kernel_calls == [] and sorted(found) == sorted(expected) == [(1, 1), (4, 4), (8, 8)]
    for size in found:
        torch.testing.assert_close(found[size], expected[size])


@pytest.mark.parametrize("setting", [["experiment=fashion_mnist"], []])
def test_the_builder_fuses_the_pairs_of_every_network_but_the_generator(setting):
    def made(*more: str) -> list[str]:
        return networks_holding(PooledSequential, [*setting, *more])

    assert made() == ["teacher", "inference teacher", "student"]  # auto
    for off in ("speed.fused_pooling=false", "speed.channels_last=false", "speed.compile=true"):
        assert made(off) == [], off
    assert made(*PUBLISHED_STYLE) == []  # the benchmark's published-style path


def test_the_operators_trace_with_their_fake_implementations():
    x = awkward_batch((2, 16, 6, 6), torch.bfloat16).nan_to_num()
    for kind in ("max", "mean"):
        torch.library.opcheck(torch.ops.tadfkd.relu_pool.default, (x, kind))
        grad = torch.ops.tadfkd.relu_pool(x, kind)
        torch.library.opcheck(torch.ops.tadfkd.relu_pool_backward.default, (x, grad, kind))


def bits(x: torch.Tensor) -> torch.Tensor:
    """x's bit patterns: -0.0 apart from 0.0, each NaN by its payload."""
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)


def signed_zeros_and_nans(bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An input (3, 1, 9, 8) with a NaN, a weight (16, 1, 3, 3) and a bias: channel 1 sums to
    -0.0 at every output, channel 2 to a negative float32 denormal that rounds to bf16 -0.0 at
    the outputs over the tiny pixels; the rest random."""
    torch.manual_seed(5)
    x, weight, bias = torch.randn(3, 1, 9, 8).abs() + 1, torch.randn(16, 1, 3, 3), torch.randn(16)
    weight[1], bias[1] = -0.0, -0.0  # -0.0 * x = -0.0 for x >= +0.0, padding included
    weight[2], bias[2] = 0.0, 0.0
    weight[2, 0, 1, 1] = -(2.0**-70)
    x[:, :, ::2, ::2] = 2.0**-70  # -2^-140: a float32 denormal under bf16's smallest
    x[2, 0, 4, 4] = float("nan")
    return (x.bfloat16() if bf16 else x), weight, bias


@pytest.mark.parametrize(("bf16", "bf16_input"), [(False, False), (True, False), (True, True)])
def test_the_single_channel_kernels_relu_is_torchs_relu_of_its_output_bit_for_bit(bf16, bf16_input):
    x, weight, bias = signed_zeros_and_nans(bf16_input)
    conv = torch.ops.tadfkd.single_channel_conv
    plain = conv(x, weight, bias, 1, 1, bf16, False)
    fused = conv(x, weight, bias, 1, 1, bf16, True)
    expected = torch.relu(plain)
    nan = expected.isnan()
    assert torch.equal(fused.isnan(), nan)  # a NaN's bits may differ in bf16 (the docstring)
    assert torch.equal(bits(fused)[~nan], bits(expected)[~nan])
    assert fused.is_contiguous(memory_format=torch.channels_last)
    negative_zero = bits(torch.tensor(-0.0, dtype=fused.dtype))
    assert bits(fused)[:2, 1].eq(negative_zero).all()  # image 2 holds the NaN
    assert bits(fused)[:2, 2].eq(negative_zero).any() == bf16
    assert fused.isnan().any() and (fused >= 0).sum() + fused.isnan().sum() == fused.numel()


def first_layer(*middle: nn.Module, after: nn.Module | None = None) -> PooledSequential:
    """A kernel convolution (1 -> 16, stride 2, with bias), ``middle``, a ReLU and ``after``,
    in a ``PooledSequential`` made by ``use_kernel``, channels-last."""
    torch.manual_seed(6)
    conv = nn.Conv2d(1, 16, 3, stride=2, padding=1)
    model = nn.Sequential(conv, *middle, nn.ReLU(), *([after] if after else []))
    model = model.to(memory_format=torch.channels_last)
    single_channel.use_kernel(model)
    assert pooling.use_kernel(model) == [""]
    return model


@pytest.mark.parametrize("autocast", [False, True])
def test_a_kernel_convolution_and_the_relu_after_it_run_as_one_kernel_bit_for_bit(
    autocast, kernel_calls
):
    model = first_layer(nn.Identity(), nn.Identity())  # a folded BatchNorm, or two
    x = torch.randn(4, 1, 14, 14)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        calls = operators.record(lambda: model(x))
        fused, plain = model(x), nn.Sequential(*model)(x)
    assert [call.name for call in calls] == ["tadfkd.single_channel_conv.default"]
    assert kernel_calls == ["single_channel_conv"] * 3  # recorded, fused, plain
    assert torch.equal(bits(fused), bits(plain))


def test_with_gradients_or_a_hook_the_convolution_and_its_relu_run_module_by_module(
    kernel_calls,
):
    model = first_layer(nn.Identity())
    x = torch.randn(4, 1, 14, 14)
    model(x.requires_grad_()).sum().backward()  # PyTorch's convolution, then its ReLU
    assert kernel_calls == [] and x.grad is not None
    seen = []
    model[1].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        fused, conv = model(x), model[0](x)
    assert seen == [(4, 16, 7, 7)] and kernel_calls == ["single_channel_conv"] * 2  # not fused
    assert torch.equal(bits(fused), bits(torch.relu(conv)))


def test_a_relu_that_starts_a_pooling_pair_is_left_to_that_pairs_kernel(kernel_calls):
    model = first_layer(after=nn.MaxPool2d(2))
    assert pooling.relu_after(list(model), 0) is None
    with torch.no_grad():
        fused = model(torch.randn(4, 1, 16, 16))
    assert kernel_calls == ["single_channel_conv", "relu_max_pool"]
    assert fused.shape == (4, 16, 4, 4)
    plain = [nn.Conv2d(1, 16, 3), nn.ReLU()]  # PyTorch's convolution: nothing to fuse into
    assert pooling.relu_after(plain, 0) is None
    kernel = first_layer()
    assert pooling.relu_after([kernel[0], nn.LeakyReLU()], 0) is None
    assert pooling.relu_after([kernel[0], nn.Identity(), nn.ReLU(inplace=True)], 0) == 2


@pytest.mark.parametrize("setting", ["fashion_mnist", "small"])
def test_the_folded_teachers_scoring_forward_runs_no_relu_of_its_own(setting):
    cfg = bench_config([*SETTINGS[setting], "runtime.device=cpu"])
    distiller = build_path(cfg, torch.device("cpu"), published=False, seed=0)
    images = distiller.synthesizer.sample(8)
    view = distiller.synthesizer.views.test_view(images)
    with torch.no_grad():
        names = [call.name for call in operators.record(lambda: distiller.inference_teacher(view))]
    assert "tadfkd.single_channel_conv.default" in names and "aten.relu.default" not in names
