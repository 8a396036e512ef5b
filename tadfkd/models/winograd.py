"""A frozen network's 3x3 convolutions in float32 by Winograd's F(4x4, 3x3) or F(2x2, 3x3), on the
CPU through a C kernel (``cpu_kernels.c``, built by ``tadfkd.models.kernels``).

The selection's scoring forward runs the folded teacher in float32, the published precision,
and its 3x3 convolutions ran at oneDNN's float32 rate, which is this CPU's float32 multiply
rate: the largest part of that forward (docs/performance.md, round eighteen). Winograd's
algorithm F(m x m, 3x3) computes each m x m block of outputs (a tile) from the (m + 2) x (m + 2)
input pixels around it with (m + 2)^2 products per channel pair where the direct sums take
9 m^2: ``speed.winograd_tile`` 4 (the default, round nineteen) takes 36 where they take 144, 2
(round eighteen's) 16 where they take 36. The transforms around the products are additions and
products by small integers (the weight's, made once on the host in float64, by fractions).
Their float rounding differs from the direct sums': by about one float32 rounding of the
products' magnitudes for m = 2; for m = 4, whose transforms' coefficients are larger, by up to
some 15 on the tests' random inputs, and as the transformed weight's fractions round, an output
takes in rounding from the rest of its tile (one whose own 3x3 window is zero can come out as a
millionth or so of its tile's magnitudes). The tests bound both against a float64 convolution;
a keep decision can differ only at the threshold. An
infinite input can give a NaN where the direct sums give an infinity, and a NaN with F(4x4, 3x3)
can reach more of its tile's outputs than the direct sums' does (in its image only, whose
logits are NaN either way).

``use_kernel`` swaps ``WinogradConv2d`` into a model's eligible convolutions (the folded
teacher's, ``speed.winograd_conv``). It computes the no-grad float32 forwards with no autocast
at one torch thread: the selection's scoring, and where the training precision is float32 (the
published precision, and an fp32-only CPU's) also the student steps' teacher logits, the health
signals and the teacher's classes of the image grid. PyTorch's convolution runs everywhere else
(gradients, autocast, other dtypes, more threads). ``tadfkd.models.pooling.PooledSequential``
runs such a convolution with the ReLU and the pooling after it (2x2 max, or the mean over the
image) in the same kernel, in the pass that writes its output.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from tadfkd.models import kernels, upsampling
from tadfkd.models.single_channel import MODULE_HOOKS, sharing_parameters

# the kernel runs on one thread; at more, oneDNN's convolution runs on them all
MAX_THREADS = 1
CHANNEL_MULTIPLE = 16  # cpu_kernels.c: whole vectors of channels (16, 8 or 4 lanes), in and out
MAX_OUTPUT_CHANNELS = 128  # cpu_kernels.c: WINOGRAD_MAX_OUTPUTS
# what follows the convolution in the kernel's pass: cpu_kernels.c's WINOGRAD_* codes
POOLS = {"none": 0, "max": 1, "mean": 2}
# F(m x m, 3x3)'s weight transform per tile size m: U = G g G^T, (m + 2, m + 2) per 3x3 kernel
# g (m = 4: the points 0, 1, -1, 2, -2 and infinity; the kernel's B^T and A^T match them)
G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: (
        (1 / 4, 0.0, 0.0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0.0, 0.0, 1.0),
    ),
}
TILES = tuple(G)  # the tile sizes m the kernel takes (speed.winograd_tile)


def tile_of(transformed: torch.Tensor) -> int:
    """The tile size m of a ``transformed_weight``: its first dimension is (m + 2)^2."""
    return {(m + 2) ** 2: m for m in TILES}[transformed.shape[0]]


def transformed_weight(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """A 3x3 ``weight`` (O, C, 3, 3) as the kernel takes it for F(``tile`` x ``tile``, 3x3):
    G g G^T of each kernel g, computed in float64 and rounded once, ((m + 2)^2, C, O) float32,
    position (m + 2) r + s first. The products in numpy, on the host: made once per weight,
    they are no part of the network's computation, and ``FlopCounterMode`` counts none of
    them."""
    g = np.array(G[tile])
    u = np.einsum("ra,ocab,sb->rsco", g, weight.detach().cpu().double().numpy(), g)
    out, inputs = weight.shape[:2]
    positions = (tile + 2) ** 2
    return torch.from_numpy(
        np.ascontiguousarray(u.reshape(positions, inputs, out), dtype=np.float32)
    )


def output_shape(x: torch.Tensor, channels: int, pool: str) -> tuple[int, int, int, int]:
    """The kernel's output (N, O, H', W') for x (N, C, H, W): the image's size, half of it
    (floor) after the max pool, one pixel after the mean."""
    n, _, h, w = x.shape
    if pool == "max":
        return (n, channels, h // 2, w // 2)
    return (n, channels, 1, 1) if pool == "mean" else (n, channels, h, w)


@kernels.operator("winograd_conv")
def winograd_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool: str
) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=1)`` for x (N, C, H, W) float32, channels-last, and the
    3x3 weight w as ``transformed_weight`` gives it, ((m + 2)^2, C, O) for the tile size m it
    was made for; then with ``pool`` "max" the
    ReLU and the 2x2 max pool of stride 2 after it, with "mean" the ReLU and the mean over the
    image ((N, O, 1, 1)), with "none" nothing. float32 out, channels-last."""
    kernels.require(pool in POOLS, "pool none, max or mean")
    kernels.require(
        x.dim() == 4
        and x.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last),
        "a float32 (N, C, H, W) input, channels-last",
    )
    kernels.require(
        weight.dim() == 3
        and weight.shape[0] in [(m + 2) ** 2 for m in TILES]
        and weight.shape[1] == x.shape[1]
        and weight.dtype == torch.float32
        and weight.is_contiguous(),
        "a transformed weight ((m + 2)^2, C, O) for m 2 or 4, float32",
    )
    channels = weight.shape[2]
    kernels.require(bias is None or bias.shape == (channels,), "a bias (O,)")
    out = torch.empty(
        output_shape(x, channels, pool), dtype=torch.float32, memory_format=torch.channels_last
    )
    n, c, h, w = x.shape
    kernels.run_kernel(
        "winograd_conv3x3",
        *(x.data_ptr(), n, h, w, c, weight.data_ptr(), kernels.pointer(bias), channels),
        *(tile_of(weight), POOLS[pool], out.data_ptr()),
    )
    return out


@winograd_conv.register_fake
def winograd_conv_fake(x, weight, bias, pool):
    """The output's shape, dtype and layout, for tracing (``torch.library.opcheck``)."""
    shape = output_shape(x, weight.shape[2], pool)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@register_flop_formula(torch.ops.tadfkd.winograd_conv, get_raw=True)
def winograd_flops(x: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> int:
    """As ``FlopCounterMode`` counts the 3x3 convolution it computes (the published
    computation's): 2 x outputs x weights per output, before any pooling."""
    n, c, h, w = x.shape
    return 2 * n * weight.shape[2] * h * w * c * 9


def eligible(conv: nn.Module) -> bool:
    """Whether the kernel can compute ``conv``: a plain ``nn.Conv2d`` 3x3 of stride 1 and zero
    padding 1, no dilation or groups, input and output channels multiples of 16 (outputs up
    to 128); its weight a parameter of its own (not reparametrised), no hooks of any kind on
    it (the swap would lose them)."""
    return (
        type(conv) is nn.Conv2d
        and upsampling.same_size_3x3(conv)
        and conv.in_channels % CHANNEL_MULTIPLE == 0
        and conv.out_channels % CHANNEL_MULTIPLE == 0
        and conv.out_channels <= MAX_OUTPUT_CHANNELS
        and isinstance(conv.weight, nn.Parameter)
        and not any(getattr(conv, hooks, None) for hooks in MODULE_HOOKS)
    )


# per convolution: copies of the parameters the transformed weight was made from, and it
_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (``eligible``) whose forwards run the kernel where it ``applies``, by
    F(``tile`` x ``tile``, 3x3); the same parameters and state-dict keys."""

    tile: int = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if applies(self, x):
            return self.kernel(x, "none")
        return super().forward(x)

    def kernel(self, x: torch.Tensor, pool: str) -> torch.Tensor:
        """The kernel's output for x where it ``applies``, with ``pool`` after it
        (``winograd_conv``)."""
        return winograd_conv(x, self.transformed(), self.bias, pool)

    def transformed(self) -> torch.Tensor:
        """The weight as the kernel takes it (``transformed_weight``) for this module's tile,
        kept while the weight holds the values it was made from (compared in full on every
        call, microseconds: version counters miss writes through ``.data``) and the tile is
        the one it was made for."""
        weight = self.weight
        if self in _made:
            copy, made = _made[self]
            if kernels.same_values(weight, copy) and tile_of(made) == self.tile:
                return made
        made = transformed_weight(weight, self.tile)
        _made[self] = (weight.detach().clone(), made)
        return made


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the kernel computes ``conv(x)`` here: a float32 (N, C, H, W) input with the
    convolution's channels, channels-last, not empty; float32 parameters on the CPU (the bias
    contiguous); no autocast; and what every kernel needs (``kernels.may_run``: no gradients, a
    CPU input, at most ``MAX_THREADS`` torch threads, not while ``torch.compile`` traces)."""
    if x.dim() != 4 or x.dtype != torch.float32 or x.shape[1] != conv.in_channels:
        return False
    if x.numel() == 0 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if not kernels.float32_parameters(conv) or torch.is_autocast_enabled("cpu"):
        return False
    return kernels.may_run(x, MAX_THREADS)


def use_kernel(model: nn.Module, tile: int = 4) -> list[str]:
    """Swap a ``WinogradConv2d`` by F(``tile`` x ``tile``, 3x3) (sharing the parameters) into
    ``model`` for each ``eligible`` convolution, at every path that holds it (one swapped
    module per convolution); the paths swapped."""
    if tile not in TILES:
        raise ValueError(f"tile {tile}: the kernel takes {' or '.join(map(str, TILES))}")

    def make(conv: nn.Conv2d) -> WinogradConv2d:
        fast = sharing_parameters(WinogradConv2d, conv)
        fast.tile = tile
        return fast

    return kernels.swap_modules(model, eligible, make)
