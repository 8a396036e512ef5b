"""The DAFL generator's no-grad bf16 forward on a CPU through fused C kernels.

``generator_kernels.c`` does each BatchNorm-LeakyReLU pair with the upsampling that follows it,
and the last pair with the one-output-channel convolution that follows it, in one pass over
memory; PyTorch's kernels take three to five. It is compiled at first use by the machine's C
compiler (``$CC``, else ``cc``) for the CPU it runs on (``-march=native``) and cached under
``~/.cache/tadfkd/kernels`` (``$TADFKD_CACHE``), named by a hash of the source, the command and
the CPU's flags. Where nothing compiles it, ``kernels()`` is None and the generator runs
PyTorch's kernels (``unavailable_reason()`` says why).

The kernels are torch custom operators (``torch.ops.tadfkd.*``), so ``FlopCounterMode`` counts
the last convolution's FLOPs as it counts PyTorch's, and dispatch modes see each call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

SOURCE = Path(__file__).with_name("generator_kernels.c")
# no contraction of a * b + c into one rounding: each product and sum rounds on its own, as in
# two PyTorch operations (the tests' float32 reference)
FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fopenmp-simd",
    "-std=c11",
    "-shared",
    "-fPIC",
]
_I64, _PTR, _F32, _F64, _INT = (
    ctypes.c_int64,
    ctypes.c_void_p,
    ctypes.c_float,
    ctypes.c_double,
    ctypes.c_int,
)
# the tensor's dims and element strides in (n, h, w, c) order, then the per-channel affine map
_LAYOUT = [_PTR, *[_I64] * 8]
SIGNATURES = {
    "batch_norm_scale_shift": [*_LAYOUT, _PTR, _PTR, _F64, _INT, _F64, _PTR, _PTR, _PTR, _PTR],
    "affine_leaky_relu_upsample": [*_LAYOUT, _PTR, _PTR, _F32, _PTR],
    "affine_leaky_relu_conv_one": [*_LAYOUT, _PTR, _PTR, _F32, _PTR, _F32, _PTR],
}
MAX_CHANNELS = 1024  # generator_kernels.c's per-channel arrays
# the kernels run on one thread: beyond two, PyTorch's parallel kernels are left to it (the
# kernels were measured to pay at one thread and to break even at two, docs/performance.md)
MAX_THREADS = 2
# the entry points' return codes (generator_kernels.c) that are not success
FAILURES = {-1: "refused its input", -2: "ran out of memory"}
_failure: list[str] = []


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TADFKD_CACHE/kernels``, else
    ``$XDG_CACHE_HOME/tadfkd/kernels``, else ``~/.cache/tadfkd/kernels``."""
    if os.environ.get("TADFKD_CACHE"):
        return Path(os.environ["TADFKD_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tadfkd" / "kernels"


def cpu_signature() -> str:
    """The CPU's model and feature flags, as the kernel is compiled for them (x86's ``flags``,
    Arm's ``Features`` and part numbers)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    keys = ("flags", "model name", "Features", "CPU implementer", "CPU part")
    lines = [line for line in info.splitlines() if line.startswith(keys)]
    return "\n".join([platform.machine(), platform.processor(), *sorted(set(lines))])


def trusted(path: Path) -> bool:
    """Whether ``path`` and its folder belong to this user and no one else can write to them:
    a library loaded from it runs as this process."""
    if not hasattr(os, "getuid"):  # no owner to compare with (Windows)
        return False
    for item in (path, path.parent):
        info = item.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return False
    return True


def compile_kernels(compiler: str, target: Path) -> str | None:
    """Compile ``SOURCE`` into ``target`` (atomically: parallel jobs may race); None, or why
    it failed in one line."""
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    except OSError as error:
        return f"cannot write to {target.parent} ({error.strerror})"
    os.close(handle)
    command = [compiler, *FLAGS, "-o", partial, str(SOURCE), "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        Path(partial).unlink(missing_ok=True)
        return f"{compiler} did not run ({error})"
    if done.returncode != 0:
        Path(partial).unlink(missing_ok=True)
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        return f"{compiler} failed: {first}"
    os.chmod(partial, 0o700)  # the linker may have written it under a group-writable umask
    os.replace(partial, target)
    return None


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built now if this machine has none cached (or one that does not
    load); None where none builds or loads (``unavailable_reason``)."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        _failure.append(f"no C compiler ({compiler}) on the PATH")
        return None
    try:
        target = cached_path(compiler)
    except (OSError, RuntimeError) as error:  # no source file, no home directory
        _failure.append(f"no kernel source or cache ({error}); set TADFKD_CACHE")
        return None
    for _ in range(2):  # the cached library, then once rebuilt if it did not load
        if not target.exists():
            failure = compile_kernels(compiler, target)
            if failure is not None:
                _failure.append(failure)
                return None
        if not trusted(target):
            _failure.append(f"{target} or its folder is writable by others; not loaded")
            return None
        try:
            library = ctypes.CDLL(str(target))
        except OSError as error:
            _failure.append(f"{target} did not load ({error})")
            target.unlink(missing_ok=True)  # built elsewhere or broken: build it once more
            continue
        for name, arguments in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, ctypes.c_int
        return library
    return None


def cached_path(compiler: str) -> Path:
    """Where the kernels built by ``compiler`` for this CPU from today's source live."""
    key = hashlib.sha256(
        b"\0".join(
            [SOURCE.read_bytes(), " ".join([compiler, *FLAGS]).encode(), cpu_signature().encode()]
        )
    ).hexdigest()[:16]
    return cache_dir() / f"generator_kernels-{key}.so"


def unavailable_reason() -> str | None:
    """Why ``kernels()`` is None, in a few words; None when they are there."""
    return None if kernels() is not None else _failure[-1]


def layout(x: torch.Tensor) -> list[int]:
    """A (N, C, H, W) tensor as the kernels take it: its address, dims and element strides
    in (n, h, w, c) order."""
    torch._check(x.dtype == torch.bfloat16 and x.dim() == 4, lambda: "a 4-d bf16 tensor")
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    return [x.data_ptr(), n, h, w, c, sn, sh, sw, sc]


def pointer(tensor: torch.Tensor | None) -> int | None:
    """A float32 tensor's data address for the kernels (None: NULL); anything else is refused,
    since the C code reads raw float32."""
    if tensor is None:
        return None
    torch._check(tensor.dtype == torch.float32 and tensor.is_contiguous(), lambda: "float32")
    return tensor.data_ptr()


def run_kernel(name: str, *arguments: int | float | None) -> None:
    """Call the entry point ``name`` of generator_kernels.c; an error if it did not run."""
    code = getattr(kernels(), name)(*arguments)
    if code != 0:
        raise RuntimeError(f"{name} (generator_kernels.c) {FAILURES.get(code, code)}")


@torch.library.custom_op(
    "tadfkd::batch_norm_scale_shift",
    mutates_args=("running_mean", "running_var"),
    device_types="cpu",
)
def batch_norm_scale_shift(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    batch_statistics: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm2d's per-channel map ``scale * x + shift`` (each (C,), float32) for x
    (N, C, H, W) bf16: from the batch's statistics, updating the running ones (when given)
    with ``momentum``, or from the running ones."""
    scale = torch.empty(x.shape[1], dtype=torch.float32)
    shift = torch.empty(x.shape[1], dtype=torch.float32)
    run_kernel(
        "batch_norm_scale_shift",
        *layout(x),
        pointer(weight),
        pointer(bias),
        eps,
        int(batch_statistics),
        momentum,
        pointer(running_mean),
        pointer(running_var),
        pointer(scale),
        pointer(shift),
    )
    return scale, shift


@torch.library.custom_op("tadfkd::affine_leaky_relu_upsample", mutates_args=(), device_types="cpu")
def affine_leaky_relu_upsample(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, slope: float
) -> torch.Tensor:
    """Nearest 2x upsampling of ``leaky_relu(scale * x + shift, slope)``: x (N, C, H, W) bf16
    -> (N, C, 2H, 2W) bf16, channels-last."""
    n, c, h, w = x.shape
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=torch.bfloat16, memory_format=torch.channels_last)
    run_kernel(
        "affine_leaky_relu_upsample",
        *layout(x),
        pointer(scale),
        pointer(shift),
        slope,
        out.data_ptr(),
    )
    return out


@torch.library.custom_op("tadfkd::affine_leaky_relu_conv_one", mutates_args=(), device_types="cpu")
def affine_leaky_relu_conv_one(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    slope: float,
) -> torch.Tensor:
    """The 3x3, padding-1 convolution with one output channel (``weight`` (1, C, 3, 3) and
    ``bias`` (1,), float32) of ``leaky_relu(scale * x + shift, slope)``, in float32: x
    (N, C, H, W) bf16, channels-last, C a multiple of 16 up to 64 -> (N, 1, H, W) float32."""
    n, c, h, w = x.shape
    taps = weight[0].permute(1, 2, 0).float().contiguous()  # (3, 3, C)
    out = torch.empty((n, 1, h, w), dtype=torch.float32)
    run_kernel(
        "affine_leaky_relu_conv_one",
        *layout(x),
        pointer(scale),
        pointer(shift),
        slope,
        pointer(taps),
        0.0 if bias is None else float(bias),
        pointer(out),
    )
    return out


@register_flop_formula(torch.ops.tadfkd.affine_leaky_relu_conv_one, get_raw=True)
def conv_one_flops(x: torch.Tensor, weight: torch.Tensor, *args, out_val=None, **kwargs) -> int:
    """As ``FlopCounterMode`` counts the convolution: 2 x outputs x weights per output."""
    n, _, h, w = x.shape
    return 2 * n * h * w * weight[0].numel()


def batch_norm_map(x: torch.Tensor, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm`` on x as a per-channel ``(scale, shift)``, with its side effects (the running
    statistics and their count) as ``norm(x)`` would have them."""
    batch_statistics = norm.training or norm.running_mean is None
    updates = norm.training and norm.track_running_stats
    momentum = 0.0
    if updates:
        norm.num_batches_tracked.add_(1)
        momentum = (
            norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
        )
    return torch.ops.tadfkd.batch_norm_scale_shift(
        x,
        norm.weight,
        norm.bias,
        norm.running_mean if updates or not batch_statistics else None,
        norm.running_var if updates or not batch_statistics else None,
        batch_statistics,
        momentum,
        norm.eps,
    )


def applies(generator: nn.Module, z: torch.Tensor) -> bool:
    """Whether the fused forward computes ``generator(z)`` here: no gradients, a CPU batch of
    at least two under bf16 autocast, at most ``MAX_THREADS`` torch threads, float32
    BatchNorm parameters and statistics of at most ``MAX_CHANNELS`` channels, compiled
    kernels."""
    if torch.is_grad_enabled() or z.device.type != "cpu" or z.shape[0] < 2:
        return False
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    if torch.get_num_threads() > MAX_THREADS:
        return False
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    tensors = [t for m in norms for t in (m.weight, m.bias, m.running_mean, m.running_var)]
    if any(t is not None and t.dtype != torch.float32 for t in tensors):
        return False
    if any(m.num_features > MAX_CHANNELS for m in norms):
        return False
    return kernels() is not None


def forward(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``generator(z)`` (``tadfkd.models.generator.Generator``) through the fused kernels;
    call only where ``applies``. The last block runs PyTorch's kernels (the generator's
    ``output_layers``) unless the generator runs its output convolution as a depthwise one
    (``speed.depthwise_output``) and the kernel computes it (``takes_output_conv``)."""
    blocks0, blocks1, blocks2 = (
        generator.conv_blocks0,
        generator.conv_blocks1,
        generator.conv_blocks2,
    )
    size = generator.init_size
    out = generator.l1(z).view(z.shape[0], generator.width, size, size)
    out = upsampled(out, blocks0[0], blocks0[1])
    out = upsampled(blocks1[0](out), blocks1[1], blocks1[2])
    out = blocks2[0](out)
    last = blocks2[3]
    if not (generator.depthwise_applies() and takes_output_conv(last, out)):
        return generator.output_layers(out)
    scale, shift = batch_norm_map(out, blocks2[1])
    out = torch.ops.tadfkd.affine_leaky_relu_conv_one(
        out, last.weight, last.bias, scale, shift, blocks2[2].negative_slope
    )
    return blocks2[4](out)


def takes_output_conv(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``affine_leaky_relu_conv_one`` computes ``conv`` on x: one output channel, 3x3,
    padding 1 (zeros), stride 1; x bf16 channels-last with 16, 32, 48 or 64 channels."""
    return (
        conv.out_channels == 1
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and x.dtype == torch.bfloat16
        and x.shape[1] % 16 == 0
        and x.shape[1] <= 64
        and x.stride(1) == 1
    )


def upsampled(x: torch.Tensor, norm: nn.BatchNorm2d, activation: nn.LeakyReLU) -> torch.Tensor:
    """``F.interpolate(activation(norm(x)), scale_factor=2)``, x bf16, in one kernel."""
    scale, shift = batch_norm_map(x, norm)
    return torch.ops.tadfkd.affine_leaky_relu_upsample(x, scale, shift, activation.negative_slope)
