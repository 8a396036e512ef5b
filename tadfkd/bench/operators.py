"""Every operator call of one fast-path iteration on the CPU, timed where it runs.

``python -m tadfkd.bench.components --operators`` runs one iteration under a dispatch mode that
sees each of torch's ATen operator calls after autocast has chosen its precision, times each
call where it runs (its inputs as the iteration left them, in cache or not) and counts its FLOPs
with the formulas of torch's ``FlopCounterMode``: the calls with FLOPs are the convolutions and
matmuls, forward and backward. This says how close those run to the matmul rate of their own
precision (bf16 or fp32, as the benchmark measures it) and how long everything else takes. Each
call's time includes a few microseconds of the recording's own re-dispatch from Python; the time
outside any operator (Python, the autograd engine, the mixture fit on the host) is not measured.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from tadfkd.bench.timing import MATMUL_DTYPES

# the name of the matmul rate each precision is compared with (``timing.MATMUL_DTYPES``)
RATE_OF_DTYPE = {dtype: name for name, dtype in MATMUL_DTYPES.items()}
# where a dense operator's weight is among its tensor arguments: what tells apart calls with the
# same output, e.g. a convolution and a depthwise one, or two backward passes on one input
WEIGHT_ARGUMENT = {"convolution": 1, "convolution_backward": 2, "addmm": 2, "baddbmm": 2}


@dataclass(frozen=True)
class OperatorCall:
    """One call: ``name`` the ATen overload (e.g. ``aten.convolution.default``), ``shape`` that
    of its first tensor output (() without one), ``dtype`` its precision (a dense operator's
    output's, another's first floating-point input's; None without one), ``seconds`` as it
    ran, ``flops`` by torch's formula (0 for memory-bound operators), ``operand`` the shape of
    its weight (``WEIGHT_ARGUMENT``; of its second tensor argument for another operator, e.g.
    ``mm``'s; () without one)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    seconds: float
    flops: float
    operand: tuple[int, ...] = ()

    @property
    def dense(self) -> bool:
        return self.flops > 0


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[OperatorCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        formula = flop_registry.get(func._overloadpacket)
        output = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        source = next((t for t in inputs if t.is_floating_point()), None)
        if formula and output is not None and output.is_floating_point():
            source = output  # what it computes in: a kernel may round float32 inputs itself
        index = WEIGHT_ARGUMENT.get(func._overloadpacket.__name__, 1)
        weight = args[index] if index < len(args) else None
        if not isinstance(weight, torch.Tensor):
            weight = inputs[1] if len(inputs) > 1 else None
        self.calls.append(
            OperatorCall(
                name=str(func),
                shape=tuple(output.shape) if output is not None else (),
                dtype=source.dtype if source is not None else None,
                seconds=seconds,
                flops=float(formula(*args, **kwargs, out_val=out)) if formula else 0.0,
                operand=tuple(weight.shape) if weight is not None else (),
            )
        )
        return out


def record(function: Callable[[], object]) -> list[OperatorCall]:
    """The operator calls of one ``function()`` on the CPU, each timed as it ran, in order."""
    with _Recorder() as recorder:
        function()
    return recorder.calls


def at_matmul_rate(call: OperatorCall, rates: dict[str, float]) -> float:
    """Seconds ``call``'s FLOPs would take at the measured matmul rate (FLOP/s, ``rates``
    keyed "fp32" and "bf16") of its precision."""
    return call.flops / rates[RATE_OF_DTYPE.get(call.dtype, "fp32")]


def seconds_of(group: list[OperatorCall]) -> float:
    return sum(call.seconds for call in group)


def rate_share(group: list[OperatorCall], rates: dict[str, float]) -> float:
    """How long ``group``'s FLOPs would take at their precisions' matmul rates, in percent of
    how long they took."""
    return 100 * sum(at_matmul_rate(call, rates) for call in group) / seconds_of(group)


def ranked(groups: dict, top: int) -> tuple[list, list[OperatorCall]]:
    """The ``top`` (key, calls) groups by time, and the calls of all the others."""
    by_time = sorted(groups.items(), key=lambda item: -seconds_of(item[1]))
    return by_time[:top], [call for _, group in by_time[top:] for call in group]


def print_dense(groups: dict[tuple, list[OperatorCall]], rates: dict[str, float], top: int) -> None:
    """The dense groups, keyed (operator, output shape, weight shape, precision): the ``top``
    by time, each with its ``rate_share``, and one row for the others."""
    print(f"convolutions and matmuls, top {top} by time:")
    print(
        f"{'operator':<42}{'output x weight':<38}{'dtype':<10}{'calls':>6}{'ms':>9}"
        f"{'% of rate':>11}"
    )
    first, rest = ranked(groups, top)
    for (name, shape, operand, dtype), group in first:
        shapes = f"{list(shape)} x {list(operand)}"
        print(
            f"{name:<42}{shapes:<38}{dtype:<10}{len(group):>6}"
            f"{seconds_of(group) * 1e3:>9.2f}{rate_share(group, rates):>11.1f}"
        )
    if rest:
        label = f"the other {len(groups) - top} groups"
        print(
            f"{label:<90}{len(rest):>6}{seconds_of(rest) * 1e3:>9.2f}"
            f"{rate_share(rest, rates):>11.1f}"
        )
    print(
        "(% of rate: of the measured matmul rate of their precision; x: the weight's shape, "
        "or a product's second factor's)"
    )


def print_other(groups: dict[str, list[OperatorCall]], top: int) -> None:
    """The other operators: the ``top`` by time, and one row for the others."""
    print(f"other operators, top {top} by time:")
    print(f"{'operator':<82}{'calls':>6}{'ms':>9}")
    first, rest = ranked(groups, top)
    for name, group in first:
        print(f"{name:<82}{len(group):>6}{seconds_of(group) * 1e3:>9.2f}")
    if rest:
        label = f"the other {len(groups) - top} operators"
        print(f"{label:<82}{len(rest):>6}{seconds_of(rest) * 1e3:>9.2f}")


def report(
    calls: list[OperatorCall], iteration_seconds: float, rates: dict[str, float], top: int = 8
) -> dict[str, float]:
    """Print the dense calls grouped by operator, output and weight shapes and precision, and
    the others by operator (``print_dense``, ``print_other``), then the split of the calls'
    time: dense operators (and how long they would take at their precision's matmul rate) and
    the others, beside ``iteration_seconds`` (the same iteration timed without the recording).
    Returns the split in seconds: ``dense``, ``dense_at_rate``, ``other``."""
    dense: dict[tuple, list[OperatorCall]] = defaultdict(list)
    other: dict[str, list[OperatorCall]] = defaultdict(list)
    for call in calls:
        if call.dense:
            dtype = str(call.dtype).removeprefix("torch.")
            dense[(call.name, call.shape, call.operand, dtype)].append(call)
        else:
            other[call.name].append(call)
    print_dense(dense, rates, top)
    print_other(other, top)
    split = {
        "dense": sum(seconds_of(group) for group in dense.values()),
        "dense_at_rate": sum(at_matmul_rate(call, rates) for call in calls if call.dense),
        "other": sum(seconds_of(group) for group in other.values()),
    }
    dense_share = split["dense_at_rate"] / split["dense"] if split["dense"] > 0 else 0.0
    print(
        f"one iteration: {iteration_seconds * 1e3:.0f} ms timed; its {len(calls)} operator calls, "
        f"each timed where it ran: convolutions and matmuls {split['dense'] * 1e3:.0f} ms (at "
        "the measured matmul rates of their precisions they would take "
        f"{split['dense_at_rate'] * 1e3:.0f} ms, {100 * dense_share:.0f}% of that), other "
        f"operators {split['other'] * 1e3:.0f} ms"
    )
    return split
