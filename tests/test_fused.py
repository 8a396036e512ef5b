"""The fused generator kernels (``tadfkd.models.fused``, ``speed.fused_generation``) compute what
PyTorch's kernels compute: BatchNorm's map and running statistics to float rounding, the
upsampling bit for bit, the output convolution to float rounding, the generator's images within
bf16 rounding; where no compiler builds them, ``auto`` runs PyTorch's kernels."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU, needs_kernels
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.base.errors import UserError
from tadfkd.bench.setting import bench_config, build_path
from tadfkd.models import fused, kernels
from tadfkd.models.generator import Generator
from tadfkd.run.builder import set_generator_speed, use_fused_generation

SLOPE = 0.2


pytestmark = pytest.mark.usefixtures("one_thread")  # where the kernels apply


def bf16_batch(shape: tuple[int, ...], channels_last: bool, offset: float = 0.0) -> torch.Tensor:
    torch.manual_seed(0)
    x = (torch.randn(shape) + offset).bfloat16()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def channel_map(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.rand(channels) + 0.5, torch.randn(channels)


@needs_kernels
@pytest.mark.parametrize("channels", [16, 24])  # a specialised and the generic channel loop
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average
def test_the_batch_norm_map_is_batch_norm_in_float32(channels, channels_last, momentum):
    norm = nn.BatchNorm2d(channels, eps=0.8, momentum=momentum)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    reference = copy.deepcopy(norm)
    with torch.no_grad():
        for offset in (3.0, -1.0):  # training: the batch's statistics, the running ones updated
            x = bf16_batch((8, channels, 5, 6), channels_last, offset)  # a mean far from 0
            scale, shift = fused.batch_norm_map(x, norm)
            expected = reference(x.float())
        mapped = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        torch.testing.assert_close(mapped, expected, rtol=1e-5, atol=1e-5)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(norm, name), getattr(reference, name))
        assert int(norm.num_batches_tracked) == int(reference.num_batches_tracked) == 2
        norm.eval(), reference.eval()  # eval: the running statistics, unchanged
        scale, shift = fused.batch_norm_map(x, norm)
        mapped = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        torch.testing.assert_close(mapped, reference(x.float()), rtol=1e-5, atol=1e-5)
        assert int(norm.num_batches_tracked) == 2


@needs_kernels
@pytest.mark.parametrize("channels", [32, 24])  # a specialised and the generic channel loop
def test_the_statistics_and_the_map_are_the_same_in_either_layout(channels):
    # the fused forward copies the linear layer's NCHW output channels-last first: the same
    # sums in the same order per channel, so the same bits
    x = bf16_batch((8, channels, 7, 5), channels_last=False, offset=3.0)
    out = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        norm = nn.BatchNorm2d(channels, eps=0.8)
        with torch.no_grad():
            scale, shift = fused.batch_norm_map(x.contiguous(memory_format=layout), norm)
            y = x.contiguous(memory_format=layout)
            mapped = fused.affine_leaky_relu(y, scale, shift, SLOPE)
            upsampled = fused.affine_leaky_relu_upsample(y, scale, shift, SLOPE)
        out[layout] = (scale, shift, norm.running_mean, norm.running_var, mapped, upsampled)
    for a, b in zip(*out.values(), strict=True):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("channels", [16, 24, 128])  # specialised, generic, the published width
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_upsampling_kernel_rounds_once_what_pytorch_computes_in_float32(
    channels, channels_last
):
    x = bf16_batch((4, channels, 7, 5), channels_last)
    scale, shift = channel_map(channels)
    with torch.no_grad():
        out = torch.ops.tadfkd.affine_leaky_relu_upsample(x, scale, shift, SLOPE)
    affine = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    expected = F.interpolate(F.leaky_relu(affine, SLOPE), scale_factor=2).bfloat16()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)


@needs_kernels
@pytest.mark.parametrize("channels", [16, 32, 48, 64])
# odd and even sizes, and the Fashion-MNIST generator's 28-pixel rows
@pytest.mark.parametrize("height, width", [(9, 11), (5, 16), (7, 28)])
def test_the_output_convolution_kernel_is_the_convolution_of_the_activation(
    channels, height, width
):
    x = bf16_batch((3, channels, height, width), channels_last=True)
    scale, shift = channel_map(channels)
    conv = nn.Conv2d(channels, 1, 3, padding=1)
    with torch.no_grad():
        out = torch.ops.tadfkd.affine_leaky_relu_conv_one(
            x, conv.weight, conv.bias, scale, shift, SLOPE
        )
        activation = F.leaky_relu(
            x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1),
            SLOPE,
        )
        expected = F.conv2d(activation, conv.weight.double(), conv.bias.double(), padding=1)
    assert out.dtype == torch.float32 and out.shape == (3, 1, height, width)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def generators(img_size: int, channels: int, width: int = 32) -> dict[str, Generator]:
    """One generator (train mode, channels-last) three ways: fp32 as published, and with the
    depthwise output convolution (as on a CPU) under bf16 autocast through PyTorch's kernels
    and through the fused ones."""
    torch.manual_seed(0)
    generator = Generator(nz=100, img_size=img_size, channels=channels, width=width)
    generator = generator.to(memory_format=torch.channels_last)
    bf16, fused_one = copy.deepcopy(generator), copy.deepcopy(generator)
    bf16.depthwise_output = fused_one.depthwise_output = True
    fused_one.fused_kernels = True
    return {"fp32": generator, "bf16": bf16, "fused": fused_one}


def images(generator: Generator, noise: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return generator(noise).float()


@needs_kernels
@pytest.mark.parametrize(
    ("img_size", "channels", "width", "train"),
    [(28, 1, 32, True), (16, 1, 32, True), (32, 3, 128, True), (28, 1, 32, False)],
)
def test_the_fused_forward_computes_the_generators_images(
    img_size, channels, width, train, kernel_calls
):
    noise = torch.randn(32, 100)
    nets = generators(img_size, channels, width)
    if not train:  # eval: BatchNorm from running statistics, moved by one batch first
        warm_up = torch.randn(32, 100)
        for net in nets.values():
            images(net, warm_up, bf16=False)
            net.eval()
    kernel_calls.clear()
    out = {name: images(net, noise, bf16=name != "fp32") for name, net in nets.items()}
    assert "affine_leaky_relu_upsample" in kernel_calls  # the fused forward ran
    # within bf16 rounding of images in [0, 1], of the published fp32 forward and of PyTorch's
    # bf16 one
    torch.testing.assert_close(out["fused"], out["fp32"], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out["fused"], out["bf16"], rtol=1e-2, atol=1e-2)
    states = {name: net.state_dict() for name, net in nets.items()}
    for key, value in states["bf16"].items():  # the running statistics moved alike
        torch.testing.assert_close(states["fused"][key], value, rtol=1e-3, atol=1e-3)


@needs_kernels
def test_without_the_depthwise_output_the_last_convolution_is_pytorchs():
    nets = generators(28, 1)
    calls = []
    nets["fused"].depthwise_output = False  # speed.depthwise_output=false: as published
    nets["fused"].conv_blocks2[3].register_forward_hook(lambda *args: calls.append(1))
    noise = torch.randn(8, 100)
    fused_images = images(nets["fused"], noise, bf16=True)
    assert calls == [1]
    torch.testing.assert_close(
        fused_images, images(nets["fp32"], noise, bf16=False), rtol=1e-2, atol=1e-2
    )


@needs_kernels
def test_the_kernels_stand_aside_for_many_threads_wide_networks_and_single_samples(monkeypatch):
    generator, noise = generators(16, 1)["fused"], torch.randn(4, 100)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert fused.applies(generator, noise)
        assert not fused.applies(generator, noise[:1])  # BatchNorm needs two values
        monkeypatch.setattr(fused, "MAX_CHANNELS", 16)  # the generator's widest has 32
        assert not fused.applies(generator, noise)
        monkeypatch.undo()
        threads = torch.get_num_threads()
        torch.set_num_threads(fused.MAX_THREADS + 1)
        try:
            assert not fused.applies(generator, noise)
        finally:
            torch.set_num_threads(threads)


@needs_kernels
def test_a_kernel_refuses_what_it_cannot_read_in_one_error():
    scale, shift = channel_map(16)
    with torch.no_grad(), pytest.raises(RuntimeError, match="refused its input"):
        one_value = bf16_batch((1, 16, 1, 1), channels_last=True)  # training needs two
        torch.ops.tadfkd.batch_norm_scale_shift(one_value, None, None, None, None, True, 0.1, 1e-5)
    x = bf16_batch((2, 16, 3, 3), channels_last=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="float32"):
        torch.ops.tadfkd.affine_leaky_relu_upsample(x, scale.double(), shift, SLOPE)
    with torch.no_grad(), pytest.raises(RuntimeError, match="bf16"):
        torch.ops.tadfkd.affine_leaky_relu_upsample(x.float(), scale, shift, SLOPE)


@needs_kernels
def test_every_fused_kernel_reads_channels_in_unit_stride(monkeypatch):
    # the linear layer's (N, C, H, W) view is copied channels-last first: its strided channels
    # cost the statistics and the map three times what the copy does
    strides, run_kernel = {}, kernels.run_kernel

    def recorded(name, *arguments):
        strides.setdefault(name, []).append(arguments[8])  # the layout's channel stride
        return run_kernel(name, *arguments)

    monkeypatch.setattr(kernels, "run_kernel", recorded)
    for phased in (True, False):  # the upsampled convolutions by phase, or upsampled first
        generator = generators(28, 1)["fused"]
        generator.phased_upsampling = phased
        images(generator, torch.randn(8, 100), bf16=True)
    assert {"batch_norm_scale_shift", "affine_leaky_relu", "affine_leaky_relu_upsample"} <= (
        strides.keys()
    )
    assert {stride for calls in strides.values() for stride in calls} == {1}


@needs_kernels
def test_the_fused_kernels_run_and_are_counted_as_the_convolution_they_replace():
    noise = torch.randn(16, 100)
    nets = generators(28, 1)
    counts = {}
    for name in ("bf16", "fused"):
        with FlopCounterMode(display=False) as counter:
            images(nets[name], noise, bf16=True)
        counts[name] = counter.get_flop_counts()["Global"]
    assert torch.ops.tadfkd.affine_leaky_relu_conv_one in counts["fused"]
    assert sum(counts["fused"].values()) == sum(counts["bf16"].values())


@needs_kernels
def test_under_torch_compile_pytorchs_kernels_are_compiled(kernel_calls):
    nets, noise = generators(28, 1), torch.randn(8, 100)
    compiled = torch.compile(nets["fused"], backend="aot_eager")
    out = images(compiled, noise, bf16=True)
    assert kernel_calls == []  # as speed.compile=true leaves the kernels out of a run
    torch.testing.assert_close(out, images(nets["bf16"], noise, bf16=True))


@needs_kernels
def test_the_operators_pass_torchs_operator_checks():
    x = bf16_batch((4, 16, 5, 6), channels_last=True)
    scale, shift = channel_map(16)
    statistics = (torch.rand(16), torch.rand(16), torch.zeros(16), torch.ones(16))
    calls = {
        torch.ops.tadfkd.batch_norm_scale_shift.default: (x, *statistics, True, 0.1, 1e-5),
        torch.ops.tadfkd.affine_leaky_relu_upsample.default: (x, scale, shift, SLOPE),
        torch.ops.tadfkd.affine_leaky_relu_conv_one.default: (
            *(x, torch.randn(1, 16, 3, 3), torch.randn(1), scale, shift, SLOPE),
        ),
    }
    for operator, arguments in calls.items():
        found = torch.library.opcheck(operator, arguments)
        assert set(found.values()) == {"SUCCESS"}, operator  # schema, fake implementation


@needs_kernels
def test_with_gradients_or_without_bf16_the_generator_runs_pytorchs_kernels(monkeypatch):
    generator = generators(28, 1)["fused"]
    monkeypatch.setattr(fused, "forward", lambda *args: pytest.fail("fused forward ran"))
    noise = torch.randn(4, 100)
    with torch.autocast("cpu", torch.bfloat16):
        generator(noise).float().sum().backward()  # the generator step
    images(generator, noise, bf16=False)  # fp32


def test_where_the_kernels_do_not_build_auto_runs_pytorchs_kernels_and_true_is_an_error(
    monkeypatch,
):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no C compiler (cc) on the PATH")
    bf16 = torch.bfloat16
    assert use_fused_generation("auto", CPU, bf16) is False
    with pytest.raises(UserError, match=r"speed.fused_generation=true needs .* \(no C compiler"):
        use_fused_generation(True, CPU, bf16)
    # nothing to fuse: a GPU, or an fp32 generator forward
    assert use_fused_generation(True, torch.device("cuda"), bf16) is False
    assert use_fused_generation(True, CPU, None) is False
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: None)
    assert use_fused_generation("auto", CPU, bf16) is True
    assert use_fused_generation(False, CPU, bf16) is False


def test_under_speed_compile_the_kernels_are_off_and_true_is_no_error(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no C compiler (cc) on the PATH")
    generator = Generator(nz=100, img_size=28, channels=1)
    speed = OmegaConf.create(
        {"depthwise_output": "auto", "phased_upsampling": "auto", "fused_generation": True}
    )
    with pytest.raises(UserError, match=r"speed.fused_generation=true needs"):
        set_generator_speed(
            generator, OmegaConf.merge(speed, {"compile": False}), CPU, torch.bfloat16
        )
    set_generator_speed(generator, OmegaConf.merge(speed, {"compile": True}), CPU, torch.bfloat16)
    assert generator.fused_kernels is False  # torch.compile fuses on its own


@needs_kernels
def test_the_builder_turns_the_kernels_on_for_a_bf16_generator_on_a_cpu():
    def generator(*overrides: str) -> nn.Module:
        cfg = bench_config(["speed.generation=bf16", *overrides])
        return build_path(cfg, CPU, published=False, seed=0).synthesizer.generator

    assert generator().fused_kernels is True  # auto
    assert generator("speed.fused_generation=false").fused_kernels is False
    assert generator("speed.compile=true").fused_kernels is False  # compile fuses on its own
    assert generator("speed.generation=fp32").fused_kernels is False
