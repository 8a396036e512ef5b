"""The project's C kernels for the CPU (``cpu_kernels.c``), built and loaded at first use.

``cpu_kernels.c`` holds the DAFL generator's fused no-grad bf16 kernels (``tadfkd.models.fused``)
the convolution of one input channel of a grayscale network's first layer
(``tadfkd.models.single_channel``), a ReLU with the pooling after it (``tadfkd.models.pooling``),
BatchNorm in training (``tadfkd.models.batchnorm``), the generator's one-output-channel convolution
with gradients (``tadfkd.models.output_conv``), a frozen network's float32 3x3 convolutions by
Winograd's algorithm (``tadfkd.models.winograd``) and the selection's mixture fit
(``tadfkd.distillation.selection``). It is compiled at first use by the machine's C compiler
(``$CC``, else ``cc``) for the CPU it runs on (``-march=native``) and cached under
``~/.cache/tadfkd/kernels`` (``$TADFKD_CACHE``), named by a hash of the source, the command and the
CPU's flags; a cached library loads only from a folder no one else can write to. Where nothing
compiles it, ``kernels()`` is None and PyTorch's kernels run (``unavailable_reason()`` says why).

Each kernel's Python function is a torch custom operator (``operator``), so that dispatch modes
(``FlopCounterMode``, fake tensors) and profilers see it; where none could, a call runs the
function without the dispatcher (``Operator``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
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
    # the layout, then its phase block (0, or C for a phases tensor read in place)
    "batch_norm_scale_shift": [
        *[*_LAYOUT, _I64],
        *[_PTR, _PTR, _F64, _INT, _F64, _PTR, _PTR, _PTR, _PTR],
    ],
    "affine_leaky_relu_upsample": [*_LAYOUT, _PTR, _PTR, _F32, _PTR],
    "affine_leaky_relu": [*_LAYOUT, _I64, _PTR, _PTR, _F32, _PTR],
    "interleave_phases": [*_LAYOUT, _PTR],
    "deinterleave_phases": [*_LAYOUT, _PTR],
    "affine_leaky_relu_conv_one": [*_LAYOUT, _I64, _PTR, _PTR, _F32, _PTR, _F32, _PTR],
    # x's layout, the output's gradient, weight (3, 3, C); x's, the weight's, the bias's grads
    "conv_one_backward": [*_LAYOUT, _PTR, _PTR, _PTR, _PTR, _PTR],
    # input, its dtype flag, (N, H, W) and strides; weight, (C, K), strides; bias; stride,
    # padding; bf16; relu; output
    "single_channel_conv": [
        *[_PTR, _INT, *[_I64] * 6],
        *[_PTR, *[_I64] * 5, _PTR],
        *[_I64, _I64, _INT, _INT, _PTR],
    ],
    # input, its dtype flag, (N, H, W, C) or (N, H * W, C), [the output's gradient], output
    "relu_max_pool": [_PTR, _INT, *[_I64] * 4, _PTR],
    "relu_max_pool_backward": [_PTR, _INT, *[_I64] * 4, _PTR, _PTR],
    "relu_mean": [_PTR, _INT, *[_I64] * 3, _PTR],
    "relu_mean_backward": [_PTR, _INT, *[_I64] * 3, _PTR, _PTR],
    # losses (rows, n) float64, rows, n, max_iter, tol, reg_covar, posterior (rows, n) float32
    "two_gaussian_posterior": [_PTR, _I64, _I64, _I64, _F64, _F64, _PTR],
    # input, its dtype flag, (M, C), weight, bias, eps, momentum, running mean and variance,
    # mean and 1 / std out, output
    "batch_norm_train": [_PTR, _INT, _I64, _I64, _PTR, _PTR, _F64, _F64, *[_PTR] * 5],
    # input, the output's gradient, dtype flag, (M, C), weight, mean, 1 / std, three gradients
    "batch_norm_train_backward": [_PTR, _PTR, _INT, _I64, _I64, *[_PTR] * 6],
    # input (N, H, W, C), the transformed weight ((m + 2)^2, C, O), bias, O, the tile m, what
    # follows, output
    "winograd_conv3x3": [_PTR, *[_I64] * 4, _PTR, _PTR, _I64, _INT, _INT, _PTR],
}
# the entry points' return codes (cpu_kernels.c) that are not success
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
        lines = done.stderr.strip().splitlines() or ["no message"]
        # the first error, not a warning before it (e.g. GCC's -Wpsabi note on AVX vectors)
        first = next((line for line in lines if "error" in line.lower()), lines[0])
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
    return cache_dir() / f"cpu_kernels-{key}.so"


def may_run(x: torch.Tensor, max_threads: int) -> bool:
    """What every no-grad kernel needs to compute on x here: no gradients recorded, and what
    every kernel needs (``may_run_with_grad``)."""
    return not torch.is_grad_enabled() and may_run_with_grad(x, max_threads)


def bf16_autocast() -> bool:
    """Whether bf16 autocast is on on the CPU (what the kernels' bf16 paths compute under)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def may_run_with_grad(x: torch.Tensor, max_threads: int) -> bool:
    """What every kernel needs to compute on x here, a kernel with its own backward too: not
    while ``torch.compile`` traces (it compiles PyTorch's operators, as with
    ``speed.compile``), a CPU tensor, at most ``max_threads`` torch threads (the kernels run on
    one), built kernels."""
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return False
    return torch.get_num_threads() <= max_threads and kernels() is not None


def unavailable_reason() -> str | None:
    """Why ``kernels()`` is None, in a few words; None when they are there."""
    return None if kernels() is not None else _failure[-1]


def require(condition: bool, expected: str) -> None:
    """A RuntimeError saying what is ``expected`` unless ``condition`` holds: the kernels'
    argument checks as ``torch._check`` makes them, without its symbolic-shape machinery (a
    plain test: the fake implementations trace concrete shapes)."""
    if not condition:
        raise RuntimeError(expected)


def layout(x: torch.Tensor) -> list[int]:
    """A (N, C, H, W) tensor as the kernels take it: its address, dims and element strides
    in (n, h, w, c) order."""
    require(x.dtype == torch.bfloat16 and x.dim() == 4, "a 4-d bf16 tensor")
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    return [x.data_ptr(), n, h, w, c, sn, sh, sw, sc]


def pixels(x: torch.Tensor, phased: bool) -> list[int]:
    """x's ``layout`` and its phase block, as the kernels that read pixels take them: x itself
    (block 0), or with ``phased`` the upsampled convolution (N, C, 2H, 2W) whose four phases
    x (N, 4 C, H + 1, W + 1), channels in unit stride, holds (``tadfkd.models.upsampling``),
    read where each phase has its pixels (block C)."""
    if not phased:
        return [*layout(x), 0]
    address, n, h, w, c4, sn, sh, sw, sc = layout(x)
    require(sc == 1 and c4 % 4 == 0, "phases in unit channel stride")
    return [address, n, 2 * (h - 1), 2 * (w - 1), c4 // 4, sn, sh, sw, sc, c4 // 4]


def empty_bf16(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """An empty bf16 (N, C, H, W) tensor of ``shape``, channels-last: the output the bf16
    kernels write (and their fake implementations describe)."""
    return torch.empty(
        shape, dtype=torch.bfloat16, device=device, memory_format=torch.channels_last
    )


def swap_modules(
    model: torch.nn.Module,
    eligible: Callable[[torch.nn.Module], bool],
    make: Callable[[torch.nn.Module], torch.nn.Module],
) -> list[str]:
    """Put ``make(module)`` (a kernel's module sharing the parameters, in the module's training
    mode) into ``model`` for each module ``eligible`` says a kernel computes, at every path
    that holds it (one swapped module per module); the paths swapped."""
    swapped, fast_of = [], {}
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if not path or not eligible(module):
            continue
        if id(module) not in fast_of:
            fast_of[id(module)] = make(module).train(module.training)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, fast_of[id(module)])
        swapped.append(path)
    return swapped


def same_values(tensor: torch.Tensor | None, copy: torch.Tensor | None) -> bool:
    """Whether ``tensor`` still holds ``copy``'s values (both None counts): what a kernel's
    module compares before reusing what it made from its parameters."""
    if tensor is None or copy is None:
        return tensor is None and copy is None
    return tensor.shape == copy.shape and tensor.dtype == copy.dtype and torch.equal(tensor, copy)


def float32_parameters(module: torch.nn.Module) -> bool:
    """Whether a module's weight is float32 on the CPU and its bias, if any, float32 and
    contiguous: what the kernels that read them as raw float32 take."""
    weight, bias = module.weight, module.bias
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    return bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())


def pointer(tensor: torch.Tensor | None) -> int | None:
    """A float32 tensor's data address for the kernels (None: NULL); anything else is refused,
    since the C code reads raw float32."""
    if tensor is None:
        return None
    require(tensor.dtype == torch.float32 and tensor.is_contiguous(), "float32")
    return tensor.data_ptr()


def run_kernel(name: str, *arguments: int | float | None) -> None:
    """Call the entry point ``name`` of cpu_kernels.c; an error if it did not run."""
    code = getattr(kernels(), name)(*arguments)
    if code != 0:
        raise RuntimeError(f"{name} (cpu_kernels.c) {FAILURES.get(code, code)}")


# the argument types a kernel's function reads as they are: no tensor subclass but a parameter
TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
PLAIN = TENSORS | {int, float, bool, str, type(None)}


class Operator:
    """A kernel's Python function registered as the CPU custom operator ``tadfkd::<name>``
    (``operator``). A call runs the function itself where nothing could see the operator
    (``unobserved``), else the operator: the dispatcher's way (the custom operator's Python
    layers) costs more than many of the kernels' own work, and an iteration of the
    Fashion-MNIST preset calls the kernels hundreds of times (docs/performance.md, round
    fifteen). Both ways run the same code on the same arguments."""

    def __init__(self, function: Callable, custom: torch.library.CustomOpDef, mutated: tuple):
        self.function, self.custom = function, custom
        names = list(inspect.signature(function).parameters)
        self.mutated = [names.index(name) for name in mutated]  # positions of mutated arguments
        functools.update_wrapper(self, function)

    def register_fake(self, fake: Callable) -> Callable:
        """``fake`` as the operator's fake implementation, for tracing."""
        return self.custom.register_fake(fake)

    def __call__(self, *arguments, **keywords):
        if keywords or not unobserved() or not plain_cpu(arguments):
            return self.custom(*arguments, **keywords)
        out = self.function(*arguments)
        for position in self.mutated:  # as the operator declares its writes
            if arguments[position] is not None:
                torch.autograd.graph.increment_version(arguments[position])
        return out


def operator(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Operator]:
    """Decorator: the function as the CPU custom operator ``tadfkd::<name>`` (schema from its
    annotations), called as an ``Operator``."""

    def register(function: Callable) -> Operator:
        custom = torch.library.custom_op(
            f"tadfkd::{name}", function, mutates_args=mutates_args, device_types="cpu"
        )
        return Operator(function, custom, mutates_args)

    return register


def plain_cpu(arguments: tuple) -> bool:
    """Whether a kernel's function may read ``arguments`` as they are: each of a ``PLAIN``
    type, every tensor on the CPU. Tensor subclasses (fake tensors outside their mode, say)
    and tensors on other devices (meta, CUDA) go the dispatcher's way: the function reads CPU
    memory. One pass, as it runs on every kernel call (``is_cpu``, not ``device.type``, which
    makes a device object: a few microseconds a call)."""
    for argument in arguments:
        kind = type(argument)
        if kind not in PLAIN or (kind in TENSORS and not argument.is_cpu):
            return False
    return True


def unobserved() -> bool:
    """Whether a kernel's operator may be skipped for its function: no gradients recorded
    (the operators have no autograd formula; inside an autograd function's forward and
    backward none are), no dispatch mode (``FlopCounterMode``, the benchmarks' operator
    recorder, fake tensors) and no profiler, which see each operator call."""
    return (
        not torch.is_grad_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._autograd._profiler_enabled()
    )
