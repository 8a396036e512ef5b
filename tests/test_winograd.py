"""The Winograd convolution kernel (``tadfkd.models.winograd``, ``speed.winograd_conv``), by F(4x4,
3x3) and by F(2x2, 3x3) (``speed.winograd_tile``), computes what PyTorch's 3x3 convolution
computes in float32, to float rounding (bounded against a float64 convolution, beside oneDNN's
own error), with the ReLU and the pooling after it; it runs in the
folded teacher's no-grad float32 CPU forwards at one thread, and PyTorch's convolution runs
wherever it does not apply. Each comparison checks that the kernel ran."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU, needs_kernels, networks_holding
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.base.errors import UserError
from tadfkd.bench.published import PUBLISHED_STYLE
from tadfkd.bench.setting import SETTINGS, bench_config, build_path
from tadfkd.models import kernels, pooling, winograd
from tadfkd.models.winograd import WinogradConv2d

pytestmark = pytest.mark.usefixtures("one_thread")  # where the kernel applies
EPS = torch.finfo(torch.float32).eps
# float32 epsilons of the sum of the products' magnitudes an output may be off by on these tests'
# random inputs, per tile size: F(4x4, 3x3)'s transforms multiply by up to 8 (seen: up to 15;
# about 1 for F(2x2, 3x3) and oneDNN)
ROUNDING = {2: 16, 4: 64}
REFERENCES = {
    "none": lambda y: y,
    "max": lambda y: F.max_pool2d(F.relu(y), 2),
    "mean": lambda y: F.relu(y).mean((2, 3), keepdim=True),
}


def conv_of(inputs: int, outputs: int, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(inputs, outputs, 3, padding=1, bias=bias).to(memory_format=torch.channels_last)


def swapped(conv: nn.Conv2d, tile: int = 4) -> WinogradConv2d:
    """A copy of ``conv`` with the kernel swapped in, by F(``tile`` x ``tile``, 3x3)."""
    model = nn.Sequential(copy.deepcopy(conv))
    assert winograd.use_kernel(model, tile) == ["0"]
    assert model[0].tile == tile
    return model[0]


def batch(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(shape).contiguous(memory_format=torch.channels_last)


def within_float_rounding(
    out: torch.Tensor, conv: nn.Conv2d, x: torch.Tensor, pool: str, tile: int = 4
) -> None:
    """``out`` against the float64 convolution (then ``pool``): each output within
    ``ROUNDING[tile]`` float32 epsilons of the sum of its products' magnitudes (the pooling
    keeps a bound: the max and the mean of bounded values); PyTorch's own float32 convolution
    within 16."""
    bias = None if conv.bias is None else conv.bias.double()
    exact = REFERENCES[pool](F.conv2d(x.double(), conv.weight.double(), bias, padding=1))
    magnitude = F.conv2d(x.double().abs(), conv.weight.double().abs(), None, padding=1)
    if bias is not None:
        magnitude = magnitude + bias.abs().view(1, -1, 1, 1)
    scale = EPS * REFERENCES[pool](magnitude).abs() + 1e-30
    assert out.shape == exact.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ((out.double() - exact).abs() <= ROUNDING[tile] * scale).all()
    with torch.no_grad():
        pytorchs = REFERENCES[pool](conv(x)).double()
    assert ((pytorchs - exact).abs() <= 16 * scale).all()


SHAPES = [  # inputs, outputs, (N, H, W)
    (16, 32, (3, 14, 14)),
    (32, 64, (2, 7, 7)),  # odd: the last tiles partly outside the image
    (32, 64, (30, 4, 4)),  # one F(4x4) tile an image: images in groups of 24, then 6
    (16, 16, (1, 5, 8)),
    (48, 80, (2, 6, 3)),  # with AVX-512, a chunk of 64 outputs and one of 16
    (64, 128, (1, 4, 4)),
    (16, 48, (2, 1, 1)),  # one pixel: a tile of zeros around it (no 2x2 window to max-pool)
]


@needs_kernels
@pytest.mark.parametrize(
    ("inputs", "outputs", "shape", "pool"),
    [
        (*case, pool)
        for case in SHAPES
        for pool in ("none", "max", "mean")
        if pool != "max" or min(case[2][1:]) >= 2
    ],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tile", winograd.TILES)
def test_the_kernel_is_pytorchs_convolution_to_float_rounding(
    inputs, outputs, shape, pool, bias, tile, kernel_calls
):
    n, h, w = shape
    conv = conv_of(inputs, outputs, bias)
    fast = swapped(conv, tile)
    x = batch((n, inputs, h, w))
    with torch.no_grad():
        out = fast.kernel(x, pool) if pool != "none" else fast(x)
    assert kernel_calls == ["winograd_conv3x3"]
    within_float_rounding(out, conv, x, pool, tile)


@needs_kernels
@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize(("size", "pool"), [((4, 4), "mean"), ((7, 7), "max"), ((5, 8), "none")])
def test_each_image_is_computed_alone_whatever_group_it_falls_in(tile, size, pool, kernel_calls):
    """Bit for bit: groups of ceil(24 / tiles) images (4x4 with F(4x4): 24, then 6; F(2x2) at
    7x7: 2; at 5x8: 2), the same sums as each image alone (so F(2x2)'s are round eighteen's,
    which took the images one by one)."""
    conv = conv_of(32, 64)
    fast, x = swapped(conv, tile), batch((30, 32, *size))
    with torch.no_grad():
        together = fast.kernel(x, pool)
        alone = torch.cat([fast.kernel(x[i : i + 1], pool) for i in range(30)])
    assert torch.equal(together, alone)
    assert kernel_calls == ["winograd_conv3x3"] * 31


@needs_kernels
def test_an_output_whose_window_is_zero_takes_in_rounding_from_its_tile_only(kernel_calls):
    """F(4x4, 3x3)'s transformed weight has fractions that do not round exactly, so an output
    takes in rounding from the rest of its tile: one whose own window is zero comes out within
    a few float32 epsilons of its tile's magnitudes, not as an exact zero (F(2x2, 3x3): zero)."""
    conv = conv_of(16, 16, bias=False)
    x = batch((2, 16, 8, 8)).abs() * 100.0
    x[:, :, :2, :2] = 0.0  # the window of output (0, 0), in the first tile of each image
    x = x.contiguous(memory_format=torch.channels_last)
    tile_magnitude = F.conv2d(x.abs(), conv.weight.abs(), None, padding=1)[:, :, :4, :4].amax()
    with torch.no_grad():
        for tile in winograd.TILES:
            corner = swapped(conv, tile).kernel(x, "none")[:, :, 0, 0]
            if tile == 2:
                assert not corner.any()
            assert (corner.abs() <= 4 * EPS * tile_magnitude).all()
    assert kernel_calls == ["winograd_conv3x3"] * 2


def test_the_tile_is_2_or_4_and_the_transformed_weight_says_which():
    conv = conv_of(16, 32)
    for tile, positions in ((2, 16), (4, 36)):
        weight = winograd.transformed_weight(conv.weight, tile)
        assert weight.shape == (positions, 16, 32) and winograd.tile_of(weight) == tile
    with pytest.raises(ValueError, match="tile 3: the kernel takes 2 or 4"):
        winograd.use_kernel(nn.Sequential(conv), 3)
    with pytest.raises(RuntimeError, match=r"a transformed weight \(\(m \+ 2\)\^2, C, O\)"):
        winograd.winograd_conv(batch((1, 16, 4, 4)), torch.zeros(25, 16, 32), None, "none")


@needs_kernels
def test_the_transformed_weight_follows_the_weight(kernel_calls):
    conv = conv_of(16, 16)
    fast, x = swapped(conv), batch((2, 16, 6, 6))
    with torch.no_grad():
        before = fast(x)
        fast.weight.mul_(2.0)  # in place: no version counter a copy would see
        conv.weight.mul_(2.0)
        doubled = fast(x)
        within_float_rounding(doubled, conv, x, "none")
        conv.weight.mul_(-1.0)
        fast.load_state_dict(conv.state_dict())
        within_float_rounding(fast(x), conv, x, "none")
    assert not torch.equal(before, doubled)
    assert kernel_calls == ["winograd_conv3x3"] * 3


@needs_kernels
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tile", winograd.TILES)
def test_a_non_finite_input_stays_non_finite_in_its_tiles_and_its_image(value, tile, kernel_calls):
    conv = conv_of(16, 32)
    fast, x = swapped(conv, tile), batch((3, 16, 8, 8))
    x[1, 4, 3, 5] = value
    with torch.no_grad():
        pooled, mean = fast.kernel(x, "max"), fast.kernel(x, "mean")
        expected = F.max_pool2d(F.relu(conv(x)), 2)
        clean = x[[0, 2]].contiguous(memory_format=torch.channels_last)
        clean_pooled, clean_mean = fast.kernel(clean, "max"), fast.kernel(clean, "mean")
    assert kernel_calls == ["winograd_conv3x3"] * 4
    # PyTorch's non-finite outputs are non-finite here too (an infinity may become a NaN, over
    # its tile); the other images are untouched
    assert not pooled[~expected.isfinite()].isfinite().any()
    assert not mean[1].isfinite().all()
    torch.testing.assert_close(pooled[[0, 2]], clean_pooled, rtol=0, atol=0)
    torch.testing.assert_close(mean[[0, 2]], clean_mean, rtol=0, atol=0)
    if value != value:  # a NaN: outputs of the tiles whose input holds it, PyTorch's among them
        reached = torch.zeros_like(expected, dtype=torch.bool)
        tiles = (
            [t for t in range(0, 8, tile) if t - 1 <= 3 <= t + tile],
            [t for t in range(0, 8, tile) if t - 1 <= 5 <= t + tile],
        )  # pixel (3, 5): the tiles' first output rows and columns
        for i in tiles[0]:
            for j in tiles[1]:
                reached[1, :, i // 2 : (i + tile) // 2, j // 2 : (j + tile) // 2] = True
        assert not (pooled.isnan() & ~reached).any()
        assert not (expected.isnan() & ~pooled.isnan()).any()
        if tile == 2:  # pooled by tile: the outputs PyTorch's NaN reaches, and no other
            assert torch.equal(pooled.isnan(), expected.isnan())


@needs_kernels
def test_elsewhere_pytorchs_convolution_runs(kernel_calls):
    conv = conv_of(16, 32)
    fast, x = swapped(conv), batch((2, 16, 6, 6))
    with torch.no_grad():
        assert winograd.applies(fast, x)
        assert not winograd.applies(fast, x.contiguous())  # NCHW
        assert not winograd.applies(fast, x.to(torch.bfloat16))
        assert not winograd.applies(fast, x[:0])
        with torch.autocast("cpu", torch.bfloat16):
            assert not winograd.applies(fast, x)
            torch.testing.assert_close(fast(x), conv(x), rtol=0, atol=0)
        torch.set_num_threads(2)
        assert not winograd.applies(fast, x)
        torch.testing.assert_close(fast(x), conv(x), rtol=0, atol=0)
        torch.set_num_threads(1)
    assert not winograd.applies(fast, x)  # gradients recorded
    out = fast(x.clone().requires_grad_())
    out.sum().backward()
    assert fast.weight.grad is not None
    assert kernel_calls == []


def test_only_plain_3x3_convolutions_of_whole_vectors_are_swapped():
    def swaps(conv: nn.Module) -> bool:
        return winograd.use_kernel(nn.Sequential(conv)) == ["0"]

    assert swaps(nn.Conv2d(16, 32, 3, padding=1))
    assert swaps(nn.Conv2d(64, 128, 3, padding=1, bias=False))
    assert not swaps(nn.Conv2d(8, 16, 3, padding=1))  # inputs not by 16
    assert not swaps(nn.Conv2d(16, 24, 3, padding=1))  # outputs not by 16
    assert not swaps(nn.Conv2d(16, 144, 3, padding=1))  # over 128 outputs
    assert not swaps(nn.Conv2d(16, 32, 3, stride=2, padding=1))
    assert not swaps(nn.Conv2d(16, 32, 3, padding=0))
    assert not swaps(nn.Conv2d(16, 32, 5, padding=2))
    assert not swaps(nn.Conv2d(16, 32, 3, padding=1, groups=2))
    assert not swaps(nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect"))
    hooked = nn.Conv2d(16, 32, 3, padding=1)
    hooked.register_forward_hook(lambda *args: None)
    assert not swaps(hooked)
    shared = nn.Conv2d(16, 16, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert winograd.use_kernel(model) == ["0", "2"] and model[0] is model[2]
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@needs_kernels
def test_the_operator_traces_and_counts_the_convolutions_flops(kernel_calls):
    conv = conv_of(16, 32)
    x = batch((2, 16, 6, 6))
    for tile in winograd.TILES:
        weight = winograd.transformed_weight(conv.weight, tile)
        for pool in winograd.POOLS:
            arguments = (x, weight, conv.bias.detach(), pool)
            torch.library.opcheck(torch.ops.tadfkd.winograd_conv.default, arguments)
    kernel_calls.clear()
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        swapped(conv)(x)  # the weight transformed in numpy: not counted
    with torch.no_grad(), FlopCounterMode(display=False) as expected:
        conv(x)
    assert counted.get_total_flops() == expected.get_total_flops() > 0
    assert kernel_calls == ["winograd_conv3x3"]  # the count's call


def teacher_features(*more: nn.Module) -> pooling.PooledSequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Identity(), nn.ReLU(), *more)
    model = model.to(memory_format=torch.channels_last)
    winograd.use_kernel(model)
    model.__class__ = pooling.PooledSequential
    return model


@needs_kernels
@pytest.mark.parametrize(
    ("pool", "kind"), [(nn.MaxPool2d(2), "max"), (nn.AdaptiveAvgPool2d(1), "mean")]
)
def test_a_container_runs_the_relu_and_pool_after_the_convolution_in_its_kernel(
    pool, kind, kernel_calls
):
    model, x = teacher_features(pool), batch((3, 16, 10, 10))
    assert pooling.pool_after(list(model), 0) == (3, kind)
    with torch.no_grad():
        out = model(x)
        kernel_calls_fused = list(kernel_calls)
        model[2].register_forward_hook(lambda *args: None)  # a hook: module by module
        kernel_calls.clear()
        by_module = model(x)
    assert kernel_calls_fused == ["winograd_conv3x3"]
    assert kernel_calls == ["winograd_conv3x3"]  # the hooked pair: PyTorch's two modules
    torch.testing.assert_close(out, by_module, rtol=1e-6, atol=1e-6)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    conv.load_state_dict(model[0].state_dict())
    within_float_rounding(out, conv, x, kind)


@needs_kernels
def test_a_pool_without_a_pixel_to_write_runs_module_by_module():
    model, x = teacher_features(nn.MaxPool2d(2)), batch((1, 16, 1, 4))
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(x)  # PyTorch's max pool says what is wrong
    assert pooling.pool_after(list(teacher_features(nn.ReLU())), 0) is None


@needs_kernels
@pytest.mark.parametrize("setting", ["fashion_mnist", "small"])
def test_the_builder_swaps_the_kernel_into_the_folded_teacher_only(setting):
    overrides = [*SETTINGS[setting], "runtime.device=cpu"]

    def made(*more: str) -> list[str]:
        return networks_holding(WinogradConv2d, [*overrides, *more])

    assert made() == ["inference teacher"]  # auto
    for off in (
        "speed.winograd_conv=false",
        "speed.fold_teacher_bn=false",
        "speed.channels_last=false",
        "speed.compile=true",
    ):
        assert made(off) == [], off
    assert made(*PUBLISHED_STYLE) == []  # the benchmark's published-style path


@needs_kernels
def test_the_folded_teachers_kernels_take_the_configured_tile():
    for tile in winograd.TILES:
        overrides = [*SETTINGS["small"], "runtime.device=cpu", f"speed.winograd_tile={tile}"]
        teacher = build_path(
            bench_config(overrides), CPU, published=False, seed=0
        ).inference_teacher
        swapped_in = [m for m in teacher.modules() if isinstance(m, WinogradConv2d)]
        assert len(swapped_in) == 2 and {m.tile for m in swapped_in} == {tile}


def test_true_where_the_kernels_do_not_build_stops_with_the_switchs_name(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no C compiler (cc) on the PATH")
    cfg = bench_config([*SETTINGS["small"], "runtime.device=cpu", "speed.winograd_conv=true"])
    with pytest.raises(UserError, match=r"^speed.winograd_conv=true needs the C kernels"):
        build_path(cfg, CPU, published=False, seed=0)


@needs_kernels
@pytest.mark.parametrize("setting", ["fashion_mnist", "small"])
def test_the_folded_teachers_scoring_logits_are_pytorchs_to_float_rounding(setting, kernel_calls):
    def built(*more: str):
        cfg = bench_config([*SETTINGS[setting], "runtime.device=cpu", *more])
        return build_path(cfg, CPU, published=False, seed=0)

    fast, plain = built(), built("speed.winograd_conv=false")
    synthesizer = fast.synthesizer
    with torch.no_grad():
        view = synthesizer.views.test_view(synthesizer.sample(16))
        kernel_calls.clear()
        found = synthesizer.scoring_logits(view)
        assert kernel_calls.count("winograd_conv3x3") == 2  # both 3x3 layers, pools included
        assert "relu_max_pool" not in kernel_calls and "relu_mean" not in kernel_calls
        expected = plain.synthesizer.scoring_logits(view)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)
