"""Timing one path of the benchmark: its iterations timed with the device synchronised, its
FLOPs counted by torch's ``FlopCounterMode``, a measured matmul rate to compare them with, and
optionally ``torch.compile`` and one profiled iteration.

The FLOPs are those of the computation as published: where the generator computes its
upsampled convolutions by phase (``speed.phased_upsampling``), with 0.47-0.69 of the
multiplies, they are counted as the 3x3 convolutions they compute (``counted_as_published``),
as a Winograd convolution's rate is quoted; so a rate compares the same work on every path.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.base import schema
from tadfkd.distillation.loop import Distiller
from tadfkd.distillation.meter import EpochMeter
from tadfkd.distillation.synthesizer import Scorer

EPOCH_ITERS = 36


@contextlib.contextmanager
def counted_as_published(distiller: Distiller) -> Iterator[None]:
    """Inside the block the generator convolves its upsampled tensors as published (3x3, not by
    phase), so that ``FlopCounterMode`` counts the published computation's FLOPs (the module
    docstring); the same images up to float rounding."""
    generator = distiller.synthesizer.generator
    if not getattr(generator, "phased_upsampling", False):
        yield
        return
    generator.phased_upsampling = False
    try:
        yield
    finally:
        generator.phased_upsampling = True


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (FLOP/s) of square ``dtype`` matrices on ``device``."""
    n, reps = (8192, 30) if device.type == "cuda" else (1024, 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronise(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronise(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


# the precisions whose matmul rates the benchmarks measure, by the names they print
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rates(device: torch.device, earlier: dict[str, float] | None = None) -> dict[str, float]:
    """The matmul rate (FLOP/s) of each of ``MATMUL_DTYPES`` on ``device``; with ``earlier``
    rates, the higher of each pair: load from other jobs only ever slows a measurement down."""
    rates = {name: matmul_rate(device, dtype) for name, dtype in MATMUL_DTYPES.items()}
    if earlier is None:
        return rates
    return {name: max(rate, earlier[name]) for name, rate in rates.items()}


def matmul_rates_line(rates: dict[str, float]) -> str:
    """``matmul_rates``' figures as the benchmarks print them."""
    figures = ", ".join(f"{name} {rate / 1e12:.4g}" for name, rate in rates.items())
    return f"measured matmul rates (TFLOP/s): {figures}"


class PathStats:
    """Timings and counts of one path over the timed iterations."""

    def __init__(self, distiller: Distiller, device: torch.device) -> None:
        self.distiller = distiller
        self.device = device
        self.seconds: list[float] = []
        self.batch_counts: list[float] = []  # batches each timed iteration generated
        self.selection_seconds = 0.0
        self.peak_bytes = 0
        self.flops_per_iteration = 0.0
        self.flops_per_scored_batch = 0.0
        self.counted_batches = 0.0
        self.warmup_seconds = 0.0
        synthesizer = distiller.synthesizer
        synthesizer.scorer = self._timed(synthesizer.scorer)

    def _timed(self, scorer: Scorer) -> Scorer:
        def timed_scorer(test_view: torch.Tensor) -> torch.Tensor:
            synchronise(self.device)
            start = time.perf_counter()
            keep = scorer(test_view)
            synchronise(self.device)
            self.selection_seconds += time.perf_counter() - start
            return keep

        return timed_scorer

    def count_flops(self) -> None:
        """FLOPs of one iteration, and of generating and scoring one extra batch."""
        distiller = self.distiller
        distiller.meter = EpochMeter()
        with counted_as_published(distiller), FlopCounterMode(display=False) as counter:
            distiller.iterate()
        self.flops_per_iteration = counter.get_total_flops()
        self.counted_batches = self.batches_generated()
        synthesizer = distiller.synthesizer
        with (
            counted_as_published(distiller),
            FlopCounterMode(display=False) as counter,
            torch.no_grad(),
        ):
            synthesizer.keep_mask(synthesizer.generate(distiller.schedule.batch_size))
        self.flops_per_scored_batch = counter.get_total_flops()

    def batches_generated(self) -> float:
        """Batches generated in the student steps since the meter was last reset."""
        return float(self.distiller.meter.sums[schema.GENERATED]) / (
            self.distiller.schedule.batch_size
        )

    def start_timing(self) -> None:
        """Forget what was timed so far (``warm_up``'s iterations): the timed ones start."""
        self.distiller.meter = EpochMeter()
        self.selection_seconds = 0.0
        self.seconds, self.batch_counts, self.peak_bytes = [], [], 0

    def time_iteration(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        before = self.batches_generated()
        synchronise(self.device)
        start = time.perf_counter()
        self.distiller.iterate()
        synchronise(self.device)
        self.seconds.append(time.perf_counter() - start)
        self.batch_counts.append(self.batches_generated() - before)
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    def figures(self, matmuls: dict[str, float]) -> dict[str, float | None]:
        iters = len(self.seconds)
        steps = self.distiller.schedule.student_steps
        size = self.distiller.schedule.batch_size
        # The median: robust to load spikes from other jobs on a shared machine.
        per_iteration = statistics.median(self.seconds)
        batches = statistics.fmean(self.batch_counts)  # student-step batches per iteration
        flops_each = iteration_flops(
            self.batch_counts,
            self.flops_per_iteration,
            self.counted_batches,
            self.flops_per_scored_batch,
        )
        flops = statistics.fmean(flops_each)
        # The median of each iteration's own rate: an iteration that generated more batches
        # is slower and did more work, so its rate compares like with like.
        rate = statistics.median(f / t for f, t in zip(flops_each, self.seconds, strict=True))
        used = float(self.distiller.meter.sums[schema.BATCHES_USED]) / iters
        return {
            "s_per_iter": per_iteration,
            "s_per_epoch": per_iteration * EPOCH_ITERS,
            "samples_per_s": (batches + 1) * size / per_iteration,
            "batches_generated": batches / steps,
            "batches_used": used / steps,
            "selection_share": 100 * self.selection_seconds / sum(self.seconds),
            "peak_gib": self.peak_bytes / 2**30 if self.device.type == "cuda" else None,
            "tflop_per_iter": flops / 1e12,
            "tflops": rate / 1e12,
            **{f"matmul_share_{name}": 100 * rate / matmul for name, matmul in matmuls.items()},
        }


def iteration_flops(
    batch_counts: list[float], counted: float, counted_batches: float, per_batch: float
) -> list[float]:
    """FLOPs of each timed iteration: those ``counted`` in one iteration that generated
    ``counted_batches`` batches, corrected by ``per_batch`` (generating and scoring one batch)
    for the batches each timed iteration generated."""
    return [counted + (count - counted_batches) * per_batch for count in batch_counts]


class TimedPath(Protocol):
    """What ``time_paths`` drives: ``PathStats``, or ``bench.processes.PathProcess``."""

    def start_timing(self) -> None: ...

    def time_iteration(self) -> None: ...


def warm_up(paths: dict[str, TimedPath], iters: int) -> None:
    """``iters`` iterations of each path whose timings ``time_paths`` then forgets."""
    for stats in paths.values():
        for _ in range(iters):
            stats.time_iteration()


def time_paths(paths: dict[str, TimedPath], iters: int) -> None:
    """``iters`` timed iterations of each path, alternating, the order flipped every time."""
    for stats in paths.values():
        stats.start_timing()
    for index in range(iters):
        order = list(paths.values())
        for stats in order if index % 2 == 0 else order[::-1]:
            stats.time_iteration()


def compile_path(stats: PathStats) -> None:
    """``torch.compile`` the path's networks in place, then one warm-up iteration (timed)."""
    distiller = stats.distiller
    networks = (distiller.teacher, distiller.inference_teacher, distiller.student)
    for network in {id(n): n for n in (*networks, distiller.synthesizer.generator)}.values():
        network.compile()
    synchronise(stats.device)
    start = time.perf_counter()
    distiller.iterate()
    synchronise(stats.device)
    stats.warmup_seconds = time.perf_counter() - start


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profile(distiller: Distiller, device: torch.device, top: int = 15) -> float | None:
    """One iteration under torch's profiler: the top kernels (operators on a CPU) by self
    time, and the host-side counts per iteration: kernel launches, synchronisations, copies.
    Returns, on a CPU, the share of the operator time in convolutions and matmuls (a fraction;
    None on a GPU or without any)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronise(device)
    with torch_profile(activities=activities) as profiler:
        distiller.iterate()
        synchronise(device)
    events = profiler.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of one fast-path iteration, top {top} by {sort}:")
    print(events.table(sort_by=sort, row_limit=top))

    def count(*fragments: str) -> int:
        return sum(e.count for e in events if any(f in e.key for f in fragments))

    if device.type == "cuda":
        print(
            f"host-side counts per iteration: kernel launches {count('LaunchKernel')}, "
            f"synchronisations {count('Synchronize')}, copies {count('Memcpy')}"
        )
        return None
    print(f"host-side counts per iteration: operator calls {count('aten::')} (CPU)")
    dense = sum(e.self_cpu_time_total for e in events if is_dense(e.key))
    other = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) - dense
    print(dense_share_line(dense, other))
    return dense / (dense + other) if dense > 0 else None


# The operators that carry an iteration's FLOPs: convolutions (forward and backward, every
# backend's) and matrix products. Everything else (normalisation, activations, pooling and
# upsampling, reductions, optimiser updates, casts and copies) is memory-bound.
DENSE_OPERATORS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::linear")


def is_dense(name: str) -> bool:
    return name.startswith("aten::") and ("conv" in name or name in DENSE_OPERATORS)


def dense_share_line(dense: float, other: float) -> str:
    """The profiled iteration's operator time (CPU self time, microseconds) in convolutions and
    matmuls (``dense``) and in the rest; with the rest free, the iteration would be 1/share
    faster."""
    if dense == 0:
        return f"operator time (self, profiled): no convolution or matmul; {other / 1e3:.1f} ms"
    share = dense / (dense + other)
    return (
        f"operator time (self, profiled): convolutions and matmuls {dense / 1e3:.1f} ms "
        f"({100 * share:.1f}%), other operators {other / 1e3:.1f} ms ({100 - 100 * share:.1f}%); "
        f"were the other operators free, the iteration would run {1 / share:.2f}x faster"
    )
