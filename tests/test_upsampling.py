"""The generator's upsampled convolutions by phase (``tadfkd.models.upsampling``,
``speed.phased_upsampling``) compute what the published upsampling-then-convolution computes:
to float64 rounding on tensors, values and gradients; the generator's images, gradients and
BatchNorm statistics to float32 rounding in fp32 and within bf16 rounding under bf16 autocast,
through PyTorch's kernels and through the fused C kernels; with 0.47-0.69 of the multiplies."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU, needs_kernels
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.bench.published import PUBLISHED_STYLE
from tadfkd.bench.setting import bench_config, build_path
from tadfkd.bench.timing import counted_as_published
from tadfkd.models import fused, upsampling
from tadfkd.models.generator import Generator

pytestmark = pytest.mark.usefixtures("one_thread")  # where the C kernels apply
SLOPE = 0.2


def published(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("height, width", [(7, 7), (5, 8), (1, 3)])
def test_the_phases_compute_the_upsampled_convolution_and_its_gradients(
    bias, channels_last, height, width
):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, 3, padding=1, bias=bias).double()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, height, width, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_(True)
    out = {}
    grads = {}
    for name, function in (("published", published), ("phased", upsampling.upsampled_conv)):
        out[name] = function(x, conv)
        weights = [x, *conv.parameters()]
        grads[name] = torch.autograd.grad(out[name].square().sum(), weights)
    assert out["phased"].shape == (2, 3, 2 * height, 2 * width)
    assert out["phased"].is_contiguous(memory_format=layout)
    torch.testing.assert_close(out["phased"], out["published"], rtol=1e-12, atol=1e-12)
    for phased_grad, published_grad in zip(grads["phased"], grads["published"], strict=True):
        torch.testing.assert_close(phased_grad, published_grad, rtol=1e-12, atol=1e-12)


def test_only_a_plain_3x3_convolution_of_stride_and_padding_one_is_computed_by_phase():
    assert upsampling.applies(nn.Conv2d(4, 4, 3, padding=1))
    assert not upsampling.applies(nn.Conv2d(4, 4, 3, padding=0))
    assert not upsampling.applies(nn.Conv2d(4, 4, 3, padding=1, stride=2))
    assert not upsampling.applies(nn.Conv2d(4, 4, 5, padding=1))
    assert not upsampling.applies(nn.Conv2d(4, 4, 3, padding=1, dilation=2))
    assert not upsampling.applies(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not upsampling.applies(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


@pytest.mark.parametrize("size, share", [(7, 1024 / 1764), (14, 3600 / 7056)])
def test_the_phases_take_half_the_multiplies_at_the_generators_sizes(size, share):
    conv, x = nn.Conv2d(32, 16, 3, padding=1), torch.randn(2, 32, size, size)
    counts = {}
    for name, function in (("published", published), ("phased", upsampling.upsampled_conv)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            function(x, conv)
        counts[name] = counter.get_total_flops()
    assert counts["phased"] == pytest.approx(share * counts["published"])


def test_no_grad_forwards_reuse_the_phase_kernels_until_the_parameters_change():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(4, 3, 3, padding=1), torch.randn(2, 4, 5, 5)
    conv.weight.grad, conv.bias.grad = torch.randn(3, 4, 3, 3), torch.randn(3)
    fused_adam = torch.optim.Adam(conv.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        first = upsampling.phase_parameters(conv, "cpu")
        assert upsampling.phase_parameters(conv, "cpu")[0] is first[0]  # kept
        for change in (
            lambda: conv.weight.add_(1.0),  # in place, as an optimiser step
            fused_adam.step,  # leaves the version counters as they were
            lambda: conv.weight.data.mul_(0.5),  # so does a write through .data
            lambda: conv.bias.mul_(2.0),
            lambda: conv.load_state_dict(nn.Conv2d(4, 3, 3, padding=1).state_dict()),
            lambda: setattr(conv, "weight", nn.Parameter(torch.randn(3, 4, 3, 3))),  # replaced
        ):
            before = upsampling.phase_parameters(conv, "cpu")
            change()
            assert upsampling.phase_parameters(conv, "cpu")[0] is not before[0]
            expected = published(x, conv)
            torch.testing.assert_close(upsampling.upsampled_conv(x, conv), expected)
        with torch.autocast("cpu", torch.bfloat16):
            kernels, bias = upsampling.phase_parameters(conv, "cpu")
        assert kernels.dtype == bias.dtype == torch.bfloat16  # as autocast would cast them
    upsampling.upsampled_conv(x, conv).sum().backward()  # with gradients: made afresh
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def generators(channels: int = 1, img_size: int = 28, width: int = 32) -> dict[str, Generator]:
    """One channels-last generator twice: as published and by phase."""
    torch.manual_seed(0)
    generator = Generator(nz=100, img_size=img_size, channels=channels, width=width)
    generator = generator.to(memory_format=torch.channels_last)
    phased = copy.deepcopy(generator)
    phased.phased_upsampling = True
    return {"published": generator, "phased": phased}


def test_the_phased_generator_computes_the_published_images_gradients_and_statistics():
    nets, noise = generators(), torch.randn(16, 100)
    images = {name: net(noise) for name, net in nets.items()}
    torch.testing.assert_close(images["phased"], images["published"], rtol=1e-5, atol=1e-5)
    for image in images.values():
        image.square().mean().backward()
    named = dict(nets["published"].named_parameters())
    largest = max(p.grad.abs().max() for p in named.values())
    for name, parameter in nets["phased"].named_parameters():
        # the convolutions' biases before BatchNorm have a gradient of zero up to rounding
        torch.testing.assert_close(
            parameter.grad, named[name].grad, rtol=1e-4, atol=1e-5 * largest, msg=name
        )
    states = {name: net.state_dict() for name, net in nets.items()}
    for key, value in states["published"].items():
        torch.testing.assert_close(states["phased"][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hooked", ["conv_blocks1", "conv_blocks1.0", "conv_blocks2.0"])
def test_a_hooked_convolution_or_block_runs_as_published_so_that_its_hooks_run(hooked):
    nets, calls, noise = generators(), [], torch.randn(8, 100)
    nets["phased"].get_submodule(hooked).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        images = {name: net(noise) for name, net in nets.items()}
    assert calls == [1]
    torch.testing.assert_close(images["phased"], images["published"], rtol=1e-5, atol=1e-5)


def bf16_images(generator: Generator, noise: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        return generator(noise).float()


@pytest.mark.parametrize("channels, img_size, width", [(1, 28, 32), (3, 32, 128)])
def test_under_bf16_the_phased_generator_is_within_bf16_rounding_of_the_published_one(
    channels, img_size, width
):
    nets, noise = generators(channels, img_size, width), torch.randn(16, 100)
    with torch.no_grad():
        fp32 = nets["published"](noise)
    for net in nets.values():
        net.load_state_dict(generators(channels, img_size, width)["published"].state_dict())
    out = {name: bf16_images(net, noise) for name, net in nets.items()}
    torch.testing.assert_close(out["phased"], fp32, rtol=1e-2, atol=1e-2)
    # no further from the fp32 images than the published order's own bf16 rounding, give or take
    phased_error = (out["phased"] - fp32).abs().max()
    assert phased_error <= 2 * (out["published"] - fp32).abs().max()


@needs_kernels
def test_the_fused_phased_forward_runs_its_kernels_and_computes_the_images(kernel_calls):
    nets, noise = generators(), torch.randn(32, 100)
    fused = copy.deepcopy(nets["phased"])
    fused.depthwise_output = fused.fused_kernels = True
    nets["phased"].depthwise_output = True
    with torch.no_grad():
        fp32 = copy.deepcopy(nets["published"])(noise)
    kernel_calls.clear()
    out = {"fused": bf16_images(fused, noise)}
    assert kernel_calls.count("affine_leaky_relu") == 2
    assert kernel_calls.count("affine_leaky_relu_conv_one") == 1
    # no upsampled tensor is made, and the kernels read the phases where they are
    assert "affine_leaky_relu_upsample" not in kernel_calls
    assert "interleave_phases" not in kernel_calls
    kernel_calls.clear()
    out["phased"] = bf16_images(nets["phased"], noise)
    assert kernel_calls == []  # without the fused kernels (fused_generation=false): PyTorch's
    torch.testing.assert_close(out["fused"], fp32, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out["fused"], out["phased"], rtol=1e-2, atol=1e-2)
    states = {"fused": fused.state_dict(), "phased": nets["phased"].state_dict()}
    for key, value in states["phased"].items():  # the running statistics moved alike
        torch.testing.assert_close(states["fused"][key], value, rtol=1e-3, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("channels", [16, 24])  # a specialised and the generic channel loop
def test_the_activation_kernel_rounds_once_what_pytorch_computes_in_float32(channels):
    torch.manual_seed(0)
    x = torch.randn(3, channels, 5, 7).bfloat16().contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
    with torch.no_grad():
        out = torch.ops.tadfkd.affine_leaky_relu(x, scale, shift, SLOPE)
    affine = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, F.leaky_relu(affine, SLOPE).bfloat16())


@needs_kernels
@pytest.mark.parametrize("channels", [16, 3])
def test_the_copying_kernels_move_each_phase_and_its_gradient_as_pytorchs_copies_do(
    channels, monkeypatch, kernel_calls
):
    torch.manual_seed(0)
    phased = torch.randn(2, 4 * channels, 6, 8).bfloat16()
    phased = phased.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(2, channels, 10, 14).bfloat16().contiguous(memory_format=torch.channels_last)
    found = {}
    for copies in ("kernels", "pytorch"):
        if copies == "pytorch":
            monkeypatch.setattr(upsampling, "copies_by_kernel", lambda x: False)
        out = upsampling.interleave_phases(phased, copy_kernels=True)
        found[copies] = (out, *torch.autograd.grad(out, phased, grad))
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert kernel_calls == ["interleave_phases", "deinterleave_phases"]
    for kernels_made, pytorch_made in zip(found["kernels"], found["pytorch"], strict=True):
        assert kernels_made.shape == pytorch_made.shape
        assert torch.equal(kernels_made, pytorch_made)
    with torch.no_grad(), pytest.raises(RuntimeError, match="refused its input"):
        torch.ops.tadfkd.interleave_phases(phased.detach().contiguous())  # channels not unit


@needs_kernels
def test_the_new_operators_pass_torchs_operator_checks():
    x = torch.randn(2, 16, 5, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    calls = {
        torch.ops.tadfkd.affine_leaky_relu.default: (x, torch.rand(16), torch.rand(16), SLOPE),
        torch.ops.tadfkd.interleave_phases.default: (x,),
        torch.ops.tadfkd.deinterleave_phases.default: (x[:, :, :4],),  # even sizes
    }
    for operator, arguments in calls.items():
        found = torch.library.opcheck(operator, arguments)
        assert set(found.values()) == {"SUCCESS"}, operator  # schema, fake implementation


def test_auto_computes_by_phase_on_the_cpu_and_false_restores_the_published_order():
    def generator(*overrides: str) -> nn.Module:
        cfg = bench_config(list(overrides))
        return build_path(cfg, CPU, published=False, seed=0).synthesizer.generator

    assert generator().phased_upsampling is True  # auto, on a CPU
    assert generator("speed.phased_upsampling=false").phased_upsampling is False
    assert generator(*PUBLISHED_STYLE).phased_upsampling is False  # the benchmark's reference


def test_the_benchmarks_count_the_published_computations_flops():
    distiller = build_path(bench_config([]), CPU, published=False, seed=0)
    generator = distiller.synthesizer.generator
    counts = {}
    for phased in (True, False):
        generator.phased_upsampling = phased
        with counted_as_published(distiller), FlopCounterMode(display=False) as counter:
            distiller.synthesizer.sample(8)
        counts[phased] = counter.get_total_flops()
        assert generator.phased_upsampling is phased  # restored after the count
    assert counts[True] == counts[False]


@needs_kernels
@pytest.mark.parametrize("channels, rows, columns", [(16, 7, 7), (32, 4, 6), (48, 5, 3)])
def test_the_kernels_read_the_phases_in_place_as_they_read_them_put_in_place(
    channels, rows, columns
):
    phases = torch.randn(3, 4 * channels, rows + 1, columns + 1).bfloat16()
    phases = phases.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        in_place = upsampling.interleave_phases(phases, copy_kernels=True)
        statistics, maps = {}, {}
        for phased in (0, 1):  # the same seed's parameters and running statistics
            torch.manual_seed(0)
            weight, bias = torch.rand(channels), torch.rand(channels)
            statistics[phased] = (torch.rand(channels), torch.rand(channels))
            maps[phased] = fused.batch_norm_scale_shift(
                *(phases if phased else in_place, weight, bias, *statistics[phased]),
                *(True, 0.1, 0.8, bool(phased)),
            )
        assert all(torch.equal(a, b) for a, b in zip(maps[0], maps[1], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(*statistics.values(), strict=True))
        scale, shift = maps[0]
        activation = fused.affine_leaky_relu(phases, scale, shift, 0.2, True)
        assert torch.equal(activation, fused.affine_leaky_relu(in_place, scale, shift, 0.2))
        conv = (torch.randn(1, channels, 3, 3), torch.randn(1), scale, shift, 0.2)
        images = fused.affine_leaky_relu_conv_one(phases, *conv, True)
        assert torch.equal(images, fused.affine_leaky_relu_conv_one(in_place, *conv))
