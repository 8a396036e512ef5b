"""Where one iteration's time goes, component by component, on the fast path.

    python -m tadfkd.bench.components --setting fashion_mnist
    python -m tadfkd.bench.components --setting small --precision fp32

Builds the benchmark's distiller (random weights, ``tadfkd.bench.setting``), runs two warm-up
iterations, then times each component on its own (the median of ``--reps`` calls) and counts
its FLOPs (torch's ``FlopCounterMode``, the published computation's: ``bench.timing``): one
generated batch (no gradients), its test view, its train view, the teacher's scoring forward,
the mixture fit, one student step on a ready batch, one generator step, and a whole student
batch with its refill. The last lines scale them to one iteration (``student_steps`` student
batches and steps plus one generator step) and compare with a timed iteration, so the table
adds up to what an iteration costs.

``--operators`` then times every operator call of one more iteration where it runs
(``tadfkd.bench.operators``): the convolutions and matmuls against the matmul rate of their
precision, and the other operators.

``--against KEY=VALUE`` (repeatable) then times whole iterations of this path and of one built
with those overrides, alternated pair by pair (which runs first swaps each pair), so that a
machine whose speed drifts by 10-20% within minutes slows both alike; it prints both medians and
the median of the paired differences:

    python -m tadfkd.bench.components --against speed.single_channel_conv=false
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.base import schema
from tadfkd.base.errors import exit_on_known_errors
from tadfkd.bench import operators
from tadfkd.bench.setting import SETTINGS, bench_config, build_path, device_name, positive_int
from tadfkd.bench.timing import counted_as_published, matmul_rates, matmul_rates_line
from tadfkd.distillation.loop import Distiller
from tadfkd.distillation.meter import EpochMeter
from tadfkd.models import batchnorm, output_conv, pooling, single_channel, upsampling, winograd
from tadfkd.models import fused as fused_module
from tadfkd.run.runtime import keep_freed_memory, malloc_policy, set_threads


def timed(
    function: Callable[[], object], reps: int, before_each: Callable[[], None] | None = None
) -> float:
    """Median seconds of ``reps`` calls (after one untimed call); ``before_each``, untimed,
    before every call."""
    seconds = []
    for rep in range(reps + 1):
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        function()
        if rep > 0:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def flops(function: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        function()
    return float(counter.get_total_flops())


def parts(distiller: Distiller) -> dict[str, Callable[[], object]]:
    """Each component of one iteration as a call, on inputs prepared once (``components``);
    the scoring forward is the selection's own (``Synthesizer.scoring_logits``)."""
    synthesizer, size = distiller.synthesizer, distiller.schedule.batch_size
    with torch.no_grad():
        images = synthesizer.sample(size)
        test_view = synthesizer.views.test_view(images)
    logits = synthesizer.scoring_logits(test_view)
    batch, _ = synthesizer.student_batch()
    refill = synthesizer.student_batch

    def student_step() -> None:
        synthesizer.student_batch = lambda: (batch, {})
        try:
            distiller.student_step()
        finally:
            synthesizer.student_batch = refill

    student, objective = distiller.student, distiller.objective
    return {
        "generate one batch (no grad)": lambda: synthesizer.sample(size),
        "test view": lambda: synthesizer.views.test_view(images),
        "train view": lambda: synthesizer.views.train_view(images),
        "teacher scoring forward": lambda: synthesizer.scoring_logits(test_view),
        "mixture fit (one batch)": lambda: synthesizer.selection.keep_mask(logits, size),
        "student step (ready batch)": student_step,
        "generator step": lambda: synthesizer.generator_step(student, objective),
        "student batch (refill)": refill,
    }


def components(distiller: Distiller, reps: int) -> dict[str, tuple[float, float]]:
    """Seconds and FLOPs of each component of one iteration."""
    found = {}
    for name, part in parts(distiller).items():
        seconds = timed(part, reps)
        with counted_as_published(distiller):  # the published computation's FLOPs
            found[name] = (seconds, flops(part))
    return found


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m tadfkd.bench.components", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="fashion_mnist")
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--reps", type=positive_int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--operators",
        action="store_true",
        help="also time each operator call of one iteration (tadfkd.bench.operators)",
    )
    parser.add_argument(
        "--top", type=positive_int, default=8, help="rows of each --operators table"
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time iterations alternated with a path built with these overrides",
    )
    parser.add_argument(
        "--pairs", type=positive_int, default=20, help="alternated pairs (--against)"
    )
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = torch.device("cpu")
    overrides = [*SETTINGS[args.setting], "runtime.device=cpu"]
    chosen = [*overrides, f"speed.precision={args.precision}", *args.set]
    cfg = bench_config(chosen)
    against_cfg = bench_config([*chosen, *args.against]) if args.against else None  # checked now
    kept_memory = keep_freed_memory(cfg.runtime.keep_freed_memory)
    distiller = build_path(cfg, device, published=False, seed=0)
    for _ in range(2):
        distiller.iterate()
    distiller.meter = EpochMeter()
    iteration = timed(distiller.iterate, 3)
    steps = distiller.schedule.student_steps
    generated = float(distiller.meter.sums[schema.GENERATED]) / distiller.schedule.batch_size
    per_step_batches = generated / (4 * steps)  # 1 untimed + 3 timed iterations
    found = components(distiller, args.reps)
    print_components(distiller, found, args, iteration, per_step_batches, kept_memory)
    if args.operators:
        operator_split(distiller, top=args.top)
    if args.against:  # two fresh paths: the one above has run more iterations than a warm-up
        paths = []
        for chosen_cfg in (cfg, against_cfg):
            paths.append(build_path(chosen_cfg, device, published=False, seed=0))
            for _ in range(2):
                paths[-1].iterate()
        print(alternated_line(*paths, args.pairs, " ".join(args.against)))
    return found


def print_components(
    distiller: Distiller,
    found: dict[str, tuple[float, float]],
    args: argparse.Namespace,
    iteration: float,
    per_step_batches: float,
    kept_memory: bool | None,
) -> None:
    """The components' table, and the iteration they add up to against the timed one."""
    device, steps = torch.device("cpu"), distiller.schedule.student_steps
    threads = torch.get_num_threads()  # the kernels stand aside beyond their thread counts
    fused = getattr(distiller.synthesizer.generator, "fused_kernels", False)
    fused = fused and threads <= fused_module.MAX_THREADS
    single = threads <= single_channel.MAX_THREADS and any(
        isinstance(module, single_channel.SingleChannelConv2d)
        for network in (distiller.inference_teacher, distiller.student)
        for module in network.modules()
    )
    pooled = threads <= pooling.MAX_THREADS and any(
        isinstance(module, pooling.PooledSequential) for module in distiller.student.modules()
    )
    normed = threads <= batchnorm.MAX_THREADS and any(
        isinstance(module, batchnorm.KernelBatchNorm2d) for module in distiller.student.modules()
    )
    tiles = {
        module.tile
        for module in distiller.inference_teacher.modules()
        if isinstance(module, winograd.WinogradConv2d) and threads <= winograd.MAX_THREADS
    }
    in_c = getattr(distiller.synthesizer.selection, "by_kernel", False)
    output = getattr(distiller.synthesizer.generator, "output_kernel", False)
    output = output and threads <= output_conv.MAX_THREADS
    print(
        f"CPU: {device_name(device)}, {args.threads} thread(s); setting {args.setting}, "
        f"precision {distiller.precision.name}, generation "
        f"{str(distiller.synthesizer.generation_dtype or 'fp32').removeprefix('torch.')}, "
        f"scoring {str(distiller.synthesizer.scoring_dtype or 'fp32').removeprefix('torch.')}; "
        f"{per_step_batches:.2f} generated batches per student step; fused generator kernels: "
        f"{'on' if fused else 'off'}; "
        f"one-input-channel convolution kernels: {'on' if single else 'off'}; "
        f"Winograd convolution kernels: "
        f"{', '.join(f'F({m}x{m}, 3x3)' for m in sorted(tiles)) or 'off'}; "
        f"ReLU-pool kernels: {'on' if pooled else 'off'}; "
        f"BatchNorm kernels: {'on' if normed else 'off'}; "
        f"output convolution kernels: {'on' if output else 'off'}; "
        f"mixture fit: {'C' if in_c else 'numpy'}; malloc: {malloc_policy(kept_memory)}"
    )
    print(f"{'component':<32}{'ms':>9}{'GFLOP':>9}{'GFLOP/s':>9}")
    for name, (seconds, count) in found.items():
        rate = count / seconds / 1e9 if seconds > 0 else 0.0
        print(f"{name:<32}{seconds * 1e3:>9.2f}{count / 1e9:>9.3f}{rate:>9.1f}")
    estimate = (
        steps * (found["student batch (refill)"][0] + found["student step (ready batch)"][0])
        + found["generator step"][0]
    )
    print(
        f"one iteration: {iteration * 1e3:.0f} ms timed; {estimate * 1e3:.0f} ms from the "
        f"components ({steps} x (student batch + student step) + generator step)"
    )


def alternated(first: Distiller, second: Distiller, pairs: int) -> list[tuple[float, float]]:
    """Seconds of ``pairs`` iterations of each of two paths, as (first, second) pairs, run
    alternately: the second runs first in every other pair. Both iterations of a pair start
    from the same seed of torch's random generator, so that two paths that compute alike draw
    the same noise and do the same work (from one shared stream, they drew different noise and
    generated different numbers of batches)."""
    found = []
    for pair in range(pairs):
        seconds = {}
        for name in ("second", "first") if pair % 2 else ("first", "second"):
            distiller = first if name == "first" else second
            torch.manual_seed(pair)
            start = time.perf_counter()
            distiller.iterate()
            seconds[name] = time.perf_counter() - start
        found.append((seconds["first"], seconds["second"]))
    return found


def alternated_line(first: Distiller, second: Distiller, pairs: int, overrides: str) -> str:
    """``alternated`` iterations of this path and of the one with ``overrides``, in one line,
    with the generated batches per student step of each (the work an iteration did)."""
    for path in (first, second):
        path.meter = EpochMeter()
    found = alternated(first, second, pairs)
    this = statistics.median(a for a, _ in found)
    other = statistics.median(b for _, b in found)
    difference = statistics.median(b - a for a, b in found)
    batches = [
        float(path.meter.sums[schema.GENERATED])
        / (path.schedule.batch_size * path.schedule.student_steps * pairs)
        for path in (first, second)
    ]
    plural = "s" if pairs != 1 else ""
    return (
        f"alternated iterations, {pairs} pair{plural}: this path {this * 1e3:.1f} ms, with "
        f"{overrides} {other * 1e3:.1f} ms (medians; {batches[0]:.2f} and {batches[1]:.2f} "
        f"generated batches per student step); {overrides} takes {difference * 1e3:+.1f} ms an "
        "iteration (the median of the paired differences)"
    )


def restore_point(distiller: Distiller) -> Callable[[], None]:
    """A function that puts ``distiller`` and torch's CPU random generator back in their state
    of now, so that the next iteration computes the same as the first one from now did, with
    the same operators: no phase kernels kept (``upsampling.forget_phase_kernels``), now or
    after a restore."""
    state, rng = copy.deepcopy(distiller.state_dict()), torch.get_rng_state()
    upsampling.forget_phase_kernels()

    def restore() -> None:
        distiller.load_state_dict(copy.deepcopy(state))  # the optimisers alias what they load
        torch.set_rng_state(rng)
        upsampling.forget_phase_kernels()

    return restore


def operator_split(distiller: Distiller, reps: int = 3, top: int = 8) -> dict[str, float]:
    """The operator split (``tadfkd.bench.operators.report``, the ``top`` groups of each kind)
    of one iteration on the CPU, run from one restore point: timed ``reps`` times on its own
    (the median), then once more with each operator call timed, so both run the same calls;
    against the fp32 and bf16 matmul rates measured before and after (the higher)."""
    restore = restore_point(distiller)  # before the matmuls, which draw random matrices
    device = torch.device("cpu")
    rates = matmul_rates(device)
    seconds = timed(distiller.iterate, reps, before_each=restore)
    restore()
    calls = operators.record(distiller.iterate)
    rates = matmul_rates(device, rates)
    print(matmul_rates_line(rates))
    return operators.report(calls, seconds, rates, top)


if __name__ == "__main__":
    with exit_on_known_errors():  # a bad --set value: one sentence, exit 2
        main()
