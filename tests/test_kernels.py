"""The C kernels' build (``tadfkd.models.kernels``): a cached library loads only from a folder
no one else writes to, a failed build says why in one line and leaves nothing behind, and on
x86 the source builds and computes alike for CPUs without AVX-512; a kernel's call skips the
dispatcher only where nothing would see its operator."""

import copy
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_kernels
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tadfkd.models import batchnorm, fused, kernels, pooling, single_channel, winograd
from tadfkd.models.generator import Generator


def test_a_cached_library_is_loaded_only_from_a_folder_no_one_else_writes(tmp_path):
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    library = folder / "cpu_kernels-0.so"
    library.write_bytes(b"")
    library.chmod(0o700)
    assert kernels.trusted(library)
    library.chmod(0o720)  # group-writable
    assert not kernels.trusted(library)
    library.chmod(0o700)
    folder.chmod(0o777)
    assert not kernels.trusted(library)


@pytest.mark.parametrize(
    ("compiler", "says"), [("false", "false failed"), ("/no/such/cc", "did not run")]
)
def test_a_failed_build_says_why_in_one_line_and_leaves_no_file(tmp_path, compiler, says):
    failure = kernels.compile_kernels(compiler, tmp_path / "kernels.so")
    assert failure is not None and failure.startswith(compiler) and says in failure
    assert "\n" not in failure
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_names_the_compilers_first_error_not_a_warning_before_it(tmp_path):
    compiler = tmp_path / "cc"
    compiler.write_text(
        "#!/bin/sh\n"
        "echo \"cpu_kernels.c: In function 'load16':\" >&2\n"
        'echo "cpu_kernels.c:170: note: the ABI of passing AVX vectors changed" >&2\n'
        "echo \"cpu_kernels.c:180:5: error: unknown type name 'f32x32'\" >&2\n"
        "exit 1\n"
    )
    compiler.chmod(0o755)
    failure = kernels.compile_kernels(str(compiler), tmp_path / "out" / "kernels.so")
    assert failure == f"{compiler} failed: cpu_kernels.c:180:5: error: unknown type name 'f32x32'"


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("cc") is None,
    reason="an x86 CPU and cc",
)
@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3"])  # SSE2 only; AVX2 (most laptops)
def test_built_for_a_cpu_without_avx512_the_kernels_compute_the_same(
    monkeypatch, tmp_path, one_thread, kernel_calls, target
):
    """The vector code is GCC's and Clang's portable extension, not AVX-512 intrinsics: built
    for an older x86 CPU than this one, every kernel runs and computes what PyTorch does."""
    flags = [f"-march={target}" if flag == "-march=native" else flag for flag in kernels.FLAGS]
    monkeypatch.setattr(kernels, "FLAGS", flags)
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setenv("TADFKD_CACHE", str(tmp_path))
    kernels.kernels.cache_clear()
    try:
        assert kernels.kernels() is not None, kernels.unavailable_reason()
        torch.manual_seed(0)
        conv = nn.Conv2d(1, 16, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
        model = nn.Sequential(copy.deepcopy(conv))
        assert single_channel.use_kernel(model) == ["0"]
        generator = Generator(nz=100, img_size=28, channels=1, width=32)
        generator = generator.to(memory_format=torch.channels_last)
        fused = copy.deepcopy(generator)
        generator.depthwise_output = fused.depthwise_output = fused.fused_kernels = True
        phased = copy.deepcopy(fused)
        phased.phased_upsampling = True
        x, noise = torch.randn(5, 1, 13, 11), torch.randn(16, 100)
        features = torch.randn(3, 16, 7, 9).contiguous(memory_format=torch.channels_last)
        pooled = {}
        for kind, pool in (("max", nn.MaxPool2d(2)), ("mean", nn.AdaptiveAvgPool2d(1))):
            for fused_pool in (True, False):
                leaf = features.clone().requires_grad_()
                out = pooling.pooled(leaf, kind) if fused_pool else pool(torch.relu(leaf))
                out.backward(torch.ones_like(out))
                pooled[kind, fused_pool] = (out.detach(), leaf.grad)
        normed = {by_kernel: trained_norm(features, by_kernel) for by_kernel in (True, False)}
        pools = {
            "max": lambda y: F.max_pool2d(F.relu(y), 2),
            "mean": lambda y: F.relu(y).mean((2, 3), keepdim=True),
            "none": lambda y: y,
        }
        for (inputs, outputs, bias), pool in zip(
            [(16, 48, True), (32, 80, True), (64, 128, False)], pools, strict=True
        ):  # chunks and remainders of the products at each vector width
            three = nn.Conv2d(inputs, outputs, 3, padding=1, bias=bias)
            three = three.to(memory_format=torch.channels_last)
            image = torch.randn(3, inputs, 7, 9).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                expected = pools[pool](three(image))
            for tile in winograd.TILES:
                winograd_model = nn.Sequential(copy.deepcopy(three))
                assert winograd.use_kernel(winograd_model, tile) == ["0"]
                with torch.no_grad():
                    by_winograd = winograd_model[0].kernel(image, pool)
                torch.testing.assert_close(by_winograd, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            out = model(x)
            with torch.autocast("cpu", torch.bfloat16):
                out_bf16, expected_bf16 = model(x), conv(x)
                expected_images, images = generator(noise).float(), fused(noise).float()
                phased_images = phased(noise).float()
        plain = copy.deepcopy(phased)  # the generator step's output convolution PyTorch's
        phased.output_kernel = True
        for net in (phased, plain):
            with torch.autocast("cpu", torch.bfloat16):  # the phases' copies of a generator step
                net(noise).float().sum().backward()
        assert {"single_channel_conv", "affine_leaky_relu_upsample"} <= set(kernel_calls)
        assert {"affine_leaky_relu_conv_one", "affine_leaky_relu"} <= set(kernel_calls)
        assert {"interleave_phases", "deinterleave_phases"} <= set(kernel_calls)
        assert kernel_calls.count("conv_one_backward") == 1
        assert kernel_calls.count("winograd_conv3x3") == 3 * len(winograd.TILES)
        for found, expected in zip(phased.parameters(), plain.parameters(), strict=True):
            scale = expected.grad.abs().max().item()
            torch.testing.assert_close(found.grad, expected.grad, rtol=0, atol=scale / 16)
        assert kernel_calls.count("single_channel_conv") == 2  # fp32, then under bf16 autocast
        assert {"relu_max_pool_backward", "relu_mean_backward"} <= set(kernel_calls)
        assert {"batch_norm_train", "batch_norm_train_backward"} <= set(kernel_calls)
        for found, expected in zip(normed[True], normed[False], strict=True):
            torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
        for kind in ("max", "mean"):
            for fused_result, result in zip(pooled[kind, True], pooled[kind, False], strict=True):
                torch.testing.assert_close(fused_result, result)
        torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, 2, 1))
        assert out_bf16.dtype == expected_bf16.dtype == torch.bfloat16
        torch.testing.assert_close(out_bf16.float(), expected_bf16.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(images, expected_images, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(phased_images, expected_images, rtol=1e-2, atol=1e-2)
    finally:
        kernels.kernels.cache_clear()  # the next test loads this machine's own build again


def trained_norm(x: torch.Tensor, by_kernel: bool) -> tuple[torch.Tensor, ...]:
    """A BatchNorm2d's training output on x, x's and the weight's gradients and the running
    variance, by the kernels or by PyTorch."""
    torch.manual_seed(0)
    module, leaf = nn.BatchNorm2d(x.shape[1]), x.clone().requires_grad_()
    if by_kernel:
        batchnorm.use_kernel(module)
    out = module(leaf)
    out.backward(x)
    return out.detach(), leaf.grad, module.weight.grad, module.running_var


class Seen(TorchDispatchMode):
    """The operators a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_kernels
def test_an_unobserved_kernel_call_skips_the_dispatcher_and_computes_the_same():
    x = torch.randn(4, 16, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    mean, var = torch.zeros(16), torch.ones(16)
    versions = (mean._version, var._version)
    with torch.no_grad():
        assert kernels.unobserved()
        direct = pooling.relu_pool(x, "max")
        fused.batch_norm_scale_shift(x, None, None, mean, var, True, 0.1, 1e-5)
        assert (mean._version, var._version) != versions  # its writes counted, as declared
        assert torch.equal(direct, torch.ops.tadfkd.relu_pool(x, "max"))
        with Seen() as seen:  # a dispatch mode (FlopCounterMode, the operator recorder) sees it
            assert not kernels.unobserved()
            observed = pooling.relu_pool(x, "max")
        assert seen.names == ["tadfkd.relu_pool.default"]
        assert torch.equal(observed, direct)
        with torch.profiler.profile():
            assert not kernels.unobserved()
    assert not kernels.unobserved()  # gradients recorded: the operators have no formula


class Marked(torch.Tensor):
    """A tensor subclass, which the function of a kernel's operator would read as a tensor."""


@needs_kernels
def test_keywords_and_tensor_subclasses_go_the_dispatchers_way(monkeypatch):
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    assert {type(x), type(nn.Parameter(x)), float, type(None)} <= kernels.PLAIN
    assert type(x.as_subclass(Marked)) not in kernels.PLAIN
    dispatched, custom = [], pooling.relu_pool.custom
    recorded = lambda *args, **kwargs: dispatched.append(kwargs) or custom(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(pooling.relu_pool, "custom", recorded)
    with torch.no_grad():
        direct = pooling.relu_pool(x, "max")
        assert dispatched == []
        assert torch.equal(pooling.relu_pool(x, kind="max"), direct)  # its own signature
        assert torch.equal(pooling.relu_pool(x.as_subclass(Marked), "max"), direct)
    assert dispatched == [{"kind": "max"}, {}]


def test_only_plain_cpu_arguments_are_read_as_they_are():
    x = torch.randn(2, 3)
    assert kernels.plain_cpu((x, nn.Parameter(x), 1, 0.5, True, "max", None))
    assert kernels.plain_cpu(())
    assert not kernels.plain_cpu((x, x.as_subclass(Marked)))
    assert not kernels.plain_cpu((x, torch.empty(2, device="meta")))
    assert not kernels.plain_cpu((nn.Parameter(torch.empty(2, device="meta")),))
    assert not kernels.plain_cpu((x, [x]))  # a list: not one of the schema's plain types


def test_a_kernels_argument_check_says_what_it_expected():
    with pytest.raises(RuntimeError, match="^float32$"):
        kernels.pointer(torch.zeros(2, dtype=torch.float64))
    kernels.require(True, "never said")
