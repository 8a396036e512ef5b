"""Benchmark of the distillation loop against a published-style implementation, in one run.

    python -m tadfkd.bench            # published CIFAR-10 setting: ResNet-34 -> ResNet-18, B=1024
    python -m tadfkd.bench --small    # digits-sized models at batch 128: seconds on a CPU
    python -m tadfkd.bench --agreement --setting fashion_mnist --generator RUN_DIR
                                      # kept-set agreement of the speed settings, trained teacher

Both paths train from the same random weights (no data or teacher file is needed), each in a
process of its own (``bench.processes``), and are timed in alternation, iteration by iteration,
so that drift in a shared machine hits both alike:

- fast: this project's ``Distiller`` with the run's ``speed.*`` defaults (autocast per
  ``--precision``, channels-last, BatchNorm folded into the teacher's no-grad forwards, the
  mixture as a 1-D EM on the host) under the run's malloc policy
  (``runtime.keep_freed_memory``);
- published-style: fp32, NCHW, teacher logits recomputed in chunks of 32 for the selection, the
  mixture fitted by scikit-learn on the CPU, one batch generated and selected at a time, under
  the C library's own malloc policy, as the published code runs.

One iteration is ``student_steps`` student steps plus one generator step; an epoch is 36.
FLOPs are those torch's ``FlopCounterMode`` counts (convolutions and matrix products, forward
and backward), compared with a matmul rate this script measures on the same device.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from omegaconf import DictConfig

from tadfkd.base.errors import exit_on_known_errors
from tadfkd.bench.agreement import agreement
from tadfkd.bench.processes import PathProcess, PathSpec
from tadfkd.bench.published import PUBLISHED_STYLE, published_style
from tadfkd.bench.setting import (
    SETTINGS,
    bench_config,
    device_name,
    non_negative_int,
    positive_int,
    thread_counts,
)
from tadfkd.bench.timing import (
    EPOCH_ITERS,
    matmul_rates,
    matmul_rates_line,
    time_paths,
    warm_up,
)
from tadfkd.distillation.precision import resolve_precision
from tadfkd.run.runtime import resolve_device

ROWS = (
    ("s_per_iter", "time per iteration (median)", "s"),
    ("s_per_epoch", f"time per epoch ({EPOCH_ITERS} iterations, extrapolated)", "s"),
    ("samples_per_s", "generated samples per second", "samples/s"),
    ("batches_generated", "generator batches generated per student step", "batches"),
    ("batches_used", "generator batches used per student step", "batches"),
    ("selection_share", "share of time in selection (teacher scoring + mixture)", "%"),
    ("peak_gib", "peak GPU memory", "GiB"),
    ("tflop_per_iter", "FLOPs per iteration (counted)", "TFLOP"),
    ("tflops", "achieved rate", "TFLOP/s"),
    ("matmul_share_fp32", "achieved rate / measured fp32 matmul rate", "%"),
    ("matmul_share_bf16", "achieved rate / measured bf16 matmul rate", "%"),
)


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def print_table(
    cfg: DictConfig,
    device: torch.device,
    precision: str,
    matmuls: dict[str, float],
    iterations: tuple[int, int],
    figures: dict[str, dict[str, float | None]],
    descriptions: dict[str, dict],
) -> None:
    """The setting, each path's process (threads, malloc policy), the measured matmul rates,
    the figures of both paths and the speed-up; ``iterations``: timed, and extra warm-up."""
    iters, warmup = iterations
    more = f" and {warmup} more" if warmup else ""
    trainer, generator = cfg.trainer, cfg.generator
    fast_process, published_process = descriptions["fast"], descriptions["published-style"]
    blas = ", ".join(str(count) for count in fast_process["blas_threads"]) or "none loaded"
    print(
        f"device: {device_name(device)}, {fast_process['threads']} CPU thread(s) (loaded "
        f"BLAS libraries: {blas}), torch "
        f"{torch.__version__}; fast path precision {precision}; {cfg.teacher.arch} -> "
        f"{cfg.student.arch}, batch {trainer.batch_size}, {trainer.student_steps} student steps "
        f"+ 1 generator step per iteration, generator nz={generator.nz} width "
        f"{generator.width} at {cfg.dataset.image_size}px; {iters} timed iterations per path "
        f"after 1 counted warm-up{more}; each path in a process of its own, malloc: fast "
        f"{fast_process['malloc']} (runtime.keep_freed_memory), published-style "
        f"{published_process['malloc']} "
        "(as the published code runs)"
    )
    print(matmul_rates_line(matmuls))
    label_width = max(len(label) for _, label, _ in ROWS) + 2
    print(f"{'figure':<{label_width}}{'fast':>12}{'published-style':>17}  unit")
    for key, label, unit in ROWS:
        fast, published = figures["fast"][key], figures["published-style"][key]
        print(
            f"{label:<{label_width}}{format_value(fast):>12}{format_value(published):>17}  {unit}"
        )
    fast, published = figures["fast"], figures["published-style"]
    print(
        "speed-up of fast over published-style: "
        f"{published['s_per_iter'] / fast['s_per_iter']:.3g}x in time per iteration, "
        f"{fast['tflops'] / published['tflops']:.3g}x in FLOP/s (the paths' selections on "
        "random weights may generate different numbers of batches)"
    )


def ceiling_line(figures: dict[str, dict[str, float | None]], ceiling: float) -> str:
    """What the fast path's figures would be were every operator other than the convolutions
    and matmuls free (the iteration ``ceiling`` times faster): the most that work on them could
    bring."""
    fast, published = figures["fast"], figures["published-style"]
    speedup = published["s_per_iter"] / fast["s_per_iter"] * ceiling
    return (
        f"with those other operators free: {speedup:.2f}x the published-style path in time per "
        f"iteration, {fast['matmul_share_bf16'] * ceiling:.1f}% of the measured bf16 matmul "
        f"rate ({fast['matmul_share_fp32'] * ceiling:.1f}% of the fp32)"
    )


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tadfkd.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--small", action="store_true", help="digits-sized models, batch 128")
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), help="the setting (default cifar10; --small: small)"
    )
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="instead of timing: the share of keep decisions that bf16 scoring and BatchNorm "
        "folding leave unchanged, with the setting's trained teacher file",
    )
    parser.add_argument(
        "--generator", type=Path, help="--agreement: a run directory whose generator to use"
    )
    parser.add_argument("--iters", type=positive_int, default=3, help="timed iterations per path")
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=0,
        help="untimed iterations per path before the timed ones, after the counted one (a run's "
        "later iterations: oneDNN has built its kernels for more of the generator step's kept "
        "counts)",
    )
    parser.add_argument("--batch-size", type=positive_int, help="override the setting's batch size")
    parser.add_argument(
        "--student-steps", type=positive_int, help="override student steps per iteration"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", help="fast path: auto, fp32, bf16, fp16")
    parser.add_argument(
        "--threads",
        type=thread_counts,
        default=[1, 2],
        help="CPU thread counts to time, comma-separated (default 1,2; ignored on a GPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override of the fast path (repeatable), e.g. speed.generation=fp32; "
        "with --agreement, of the config every compared variant starts from",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the fast path (after counting)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one fast-path iteration: top kernels, launches, syncs, copies",
    )
    return parser.parse_args(argv)


def time_setting(
    fast_cfg: DictConfig,
    published_cfg: DictConfig,
    device: torch.device,
    precision: str,
    args: argparse.Namespace,
    threads: int | None,
) -> dict[str, dict[str, float | None]]:
    """Both paths, each in a process of its own at ``threads`` CPU threads, timed in
    alternation; and their table."""
    matmuls = matmul_rates(device)
    fast_policy = fast_cfg.runtime.keep_freed_memory
    shared = {"device": str(device), "seed": args.seed, "threads": threads}
    specs = [
        # the fast path under the run's malloc policy, the published-style path under the C
        # library's own, as the published code runs
        PathSpec("fast", fast_cfg, published=False, keep_freed_memory=fast_policy, **shared),
        PathSpec(
            "published-style", published_cfg, published=True, keep_freed_memory=False, **shared
        ),
    ]
    with contextlib.ExitStack() as stack:
        paths = {spec.name: stack.enter_context(PathProcess(spec)) for spec in specs}
        compiled = paths["fast"].compile() if args.compile else None
        warm_up(paths, args.warmup)
        if compiled is not None:  # the graphs compiled so far: recompiles are counted after
            compiled = (compiled[0], paths["fast"].compiled_graphs())
        time_paths(paths, args.iters)
        matmuls = matmul_rates(device, matmuls)  # measured again after the timed iterations
        figures = {name: path.figures(matmuls) for name, path in paths.items()}
        descriptions = {name: path.description for name, path in paths.items()}
        print_table(
            fast_cfg, device, precision, matmuls, (args.iters, args.warmup), figures, descriptions
        )
        if compiled is not None:
            warmup_seconds, graphs = compiled
            print(
                f"compile: warm-up (compiling) iteration {warmup_seconds:.1f} s; graphs "
                f"compiled during the {args.iters} timed iterations (recompiles): "
                f"{paths['fast'].compiled_graphs() - graphs}"
            )
        if args.profile:
            text, dense_share = paths["fast"].profile()
            print(text, end="")
            if dense_share is not None:
                print(ceiling_line(figures, 1 / dense_share))
    return figures


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    args = arguments(argv)
    setting = args.setting or ("small" if args.small else "cifar10")
    overrides = [*SETTINGS[setting], f"runtime.device={args.device}"]
    if args.batch_size is not None:
        overrides.append(f"trainer.batch_size={args.batch_size}")
    if args.student_steps is not None:
        overrides.append(f"trainer.student_steps={args.student_steps}")
    if args.agreement:  # --set: the config every compared variant starts from
        cfg = bench_config([*overrides, *args.set])
        return agreement(cfg, resolve_device(args.device), args.generator)
    fast_cfg = bench_config([*overrides, f"speed.precision={args.precision}", *args.set])
    published_cfg = published_style(bench_config([*overrides, *PUBLISHED_STYLE]))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    thread_counts = [None] if device.type == "cuda" else args.threads
    figures: dict[str, dict[str, float | None]] = {}
    for threads in thread_counts:
        if threads is not None:
            # the matmul rates are measured here, at the timed count (each path's process sets
            # its own threads: torch's, numpy's BLAS and scikit-learn's OpenMP)
            torch.set_num_threads(threads)
        figures = time_setting(fast_cfg, published_cfg, device, precision, args, threads)
    return figures


if __name__ == "__main__":
    with exit_on_known_errors():  # a bad --set value: one sentence, exit 2
        main()
