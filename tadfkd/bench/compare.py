"""Benchmark of the distillation loop against a published-style implementation, in one run.

    python -m tadfkd.bench            # published CIFAR-10 setting: ResNet-34 -> ResNet-18, B=1024
    python -m tadfkd.bench --small    # digits-sized models at batch 128: seconds on a CPU
    python -m tadfkd.bench --agreement --setting fashion_mnist --generator RUN_DIR
                                      # kept-set agreement of the speed settings, trained teacher

Both paths train from the same random weights (no data or teacher file is needed) and are timed
in alternation, iteration by iteration, so that drift in a shared machine hits both alike:

- fast: this project's ``Distiller`` (autocast per ``--precision``, channels-last on CUDA,
  several generated batches scored in one teacher forward with one mixture per batch);
- published-style (``tadfkd.bench.published``): fp32, teacher logits recomputed in chunks of 32
  for the selection, the mixture fitted by scikit-learn on the CPU, one batch generated and
  selected at a time.

One iteration is ``student_steps`` student steps plus one generator step; an epoch is 36.
FLOPs are those torch's ``FlopCounterMode`` counts (convolutions and matrix products, forward
and backward), compared with a matmul rate this script measures on the same device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.base import schema
from tadfkd.bench.published import PUBLISHED_STYLE, PublishedStyleScorer
from tadfkd.distillation.loop import Distiller
from tadfkd.distillation.meter import EpochMeter
from tadfkd.distillation.precision import cpu_has_bf16, resolve_precision
from tadfkd.distillation.synthesizer import Scorer
from tadfkd.run.builder import build_distiller
from tadfkd.run.runtime import cpu_name, resolve_device
from tadfkd.teachers.loading import random_teacher

EPOCH_ITERS = 36
CONF = Path(__file__).resolve().parents[2] / "conf"
# The two settings, as overrides of the run's config: the published CIFAR-10 command, and the
# digits default (``--small``), both with random-weight networks.
SETTINGS = {
    "cifar10": ["experiment=cifar10"],
    "small": [],
    "fashion_mnist": ["experiment=fashion_mnist"],
}


def bench_config(overrides: list[str]) -> DictConfig:
    """The run's config with ``overrides`` (no W&B, no test set needed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, "logger=none"])


def build(cfg: DictConfig, device: torch.device, published: bool, seed: int) -> Distiller:
    """The run's ``Distiller`` (published-style: its ``PUBLISHED_STYLE`` settings and scorer)
    with random-weight networks from ``seed``."""
    torch.manual_seed(seed)
    distiller = build_distiller(cfg, random_teacher(cfg.teacher), device)
    if published:
        synthesizer = distiller.synthesizer
        synthesizer.scorer = PublishedStyleScorer(
            synthesizer.scoring_teacher, synthesizer.selection
        )
    return distiller


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


class PathStats:
    """Timings and counts of one path over the timed iterations."""

    def __init__(self, distiller: Distiller, device: torch.device) -> None:
        self.distiller = distiller
        self.device = device
        self.seconds: list[float] = []
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
        with FlopCounterMode(display=False) as counter:
            distiller.iterate()
        self.flops_per_iteration = counter.get_total_flops()
        self.counted_batches = self.batches_generated()
        synthesizer = distiller.synthesizer
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            synthesizer.keep_mask(synthesizer.generate(distiller.schedule.batch_size))
        self.flops_per_scored_batch = counter.get_total_flops()

    def batches_generated(self) -> float:
        """Batches generated in the student steps since the meter was last reset."""
        return float(self.distiller.meter.sums[schema.GENERATED]) / (
            self.distiller.schedule.batch_size
        )

    def start_timing(self) -> None:
        self.distiller.meter = EpochMeter()
        self.selection_seconds = 0.0

    def time_iteration(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronise(self.device)
        start = time.perf_counter()
        self.distiller.iterate()
        synchronise(self.device)
        self.seconds.append(time.perf_counter() - start)
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    def figures(self, matmuls: dict[str, float]) -> dict[str, float | None]:
        iters = len(self.seconds)
        steps = self.distiller.schedule.student_steps
        size = self.distiller.schedule.batch_size
        # The median: robust to load spikes from other jobs on a shared machine.
        per_iteration = statistics.median(self.seconds)
        batches = self.batches_generated() / iters  # student-step batches per iteration
        # The counted iteration may have generated a different number of batches.
        flops = (
            self.flops_per_iteration
            + (batches - self.counted_batches) * self.flops_per_scored_batch
        )
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
            "tflops": flops / per_iteration / 1e12,
            **{
                f"matmul_share_{name}": 100 * flops / per_iteration / rate
                for name, rate in matmuls.items()
            },
        }


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


def profile(distiller: Distiller, device: torch.device, top: int = 15) -> None:
    """One iteration under torch's profiler: the top kernels (operators on a CPU) by self
    time, and the host-side counts per iteration: kernel launches, synchronisations, copies."""
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
    else:
        print(f"host-side counts per iteration: operator calls {count('aten::')} (CPU)")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and whether it has bf16 units."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} (bf16 units: {'yes' if cpu_has_bf16() else 'no'})"


def print_table(
    cfg: DictConfig,
    device: torch.device,
    precision: str,
    matmuls: dict[str, float],
    iters: int,
    figures: dict[str, dict[str, float | None]],
) -> None:
    """The setting, the measured matmul rates, the figures of both paths and the speed-up."""
    trainer, generator = cfg.trainer, cfg.generator
    print(
        f"device: {device_name(device)}, {torch.get_num_threads()} CPU thread(s), torch "
        f"{torch.__version__}; fast path precision {precision}; {cfg.teacher.arch} -> "
        f"{cfg.student.arch}, batch {trainer.batch_size}, {trainer.student_steps} student steps "
        f"+ 1 generator step per iteration, generator nz={generator.nz} width "
        f"{generator.width} at {cfg.dataset.image_size}px; {iters} timed iterations per path "
        "after 1 counted warm-up"
    )
    rates = ", ".join(f"{name} {rate / 1e12:.4g}" for name, rate in matmuls.items())
    print(f"measured matmul rates (TFLOP/s): {rates}")
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


def agreement(
    cfg: DictConfig, device: torch.device, generator_run: Path | None, batches: int = 32
) -> dict[str, float]:
    """Keep decisions of the configured (trained) teacher on ``batches`` generated batches,
    the reference (everything fp32, BatchNorm unfolded) against each speed setting that can
    change them (folding, bf16 scoring, a bf16 generator forward, this device's default): the
    share left unchanged by each (fractions; printed as percent)."""
    default_precision = resolve_precision(str(cfg.speed.precision), device)
    from tadfkd.run.checkpoint import load_checkpoint
    from tadfkd.run.runtime import build

    masks: dict[str, torch.Tensor] = {}
    fp32 = ["speed.precision=fp32"]
    variants = {
        "reference (fp32, unfolded)": [*fp32, "speed.fold_teacher_bn=false"],
        "fold_teacher_bn=true": fp32,
        "scoring=bf16": [*fp32, "speed.scoring=bf16"],
        "generation=bf16": [*fp32, "speed.generation=bf16"],
        "generation=bf16, scoring=bf16": [*fp32, "speed.generation=bf16", "speed.scoring=bf16"],
        f"this device's default (speed.precision=auto: {default_precision})": [],
    }
    for name, overrides in variants.items():
        variant_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        torch.manual_seed(0)
        distiller = build_distiller(variant_cfg, build(cfg.teacher), device)
        synthesizer = distiller.synthesizer
        if generator_run is not None:
            saved = load_checkpoint(generator_run)
            if saved is None:
                raise SystemExit(f"error: {generator_run} holds no checkpoint")
            synthesizer.generator.load_state_dict(saved[0]["distiller"]["generator"])
        torch.manual_seed(1)
        with torch.no_grad():
            images = torch.cat(
                [synthesizer.generate(synthesizer.batch_size) for _ in range(batches)]
            )
            masks[name] = synthesizer.keep_mask(images)
    reference = masks.pop("reference (fp32, unfolded)")
    print(
        f"teacher {cfg.teacher.name} ({cfg.teacher.arch}), generator "
        f"{generator_run or 'untrained'}, {reference.numel()} generated samples, "
        f"{100 * reference.float().mean():.1f}% kept by the reference (fp32, unfolded)"
    )
    shares = {}
    for name, mask in masks.items():
        shares[name] = float((mask == reference).float().mean())
        print(f"{name}: {100 * shares[name]:.2f}% of the keep decisions unchanged")
    return shares


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
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per path")
    parser.add_argument("--batch-size", type=int, help="override the setting's batch size")
    parser.add_argument("--student-steps", type=int, help="override student steps per iteration")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", help="fast path: auto, fp32, bf16, fp16")
    parser.add_argument(
        "--threads",
        type=lambda text: [int(t) for t in text.split(",")],
        default=[1, 2],
        help="CPU thread counts to time, comma-separated (default 1,2; ignored on a GPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override of the fast path (repeatable), e.g. speed.generation=fp32",
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


def time_paths(paths: dict[str, PathStats], iters: int) -> None:
    """``iters`` timed iterations of each path, alternating, the order flipped every time."""
    for stats in paths.values():
        stats.start_timing()
    for index in range(iters):
        order = list(paths.values())
        for stats in order if index % 2 == 0 else order[::-1]:
            stats.time_iteration()


def time_setting(
    fast_cfg: DictConfig,
    published_cfg: DictConfig,
    device: torch.device,
    precision: str,
    args: argparse.Namespace,
) -> dict[str, dict[str, float | None]]:
    """Both paths timed in alternation at the current thread count, and their table."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    matmuls = {name: matmul_rate(device, dtype) for name, dtype in dtypes.items()}
    paths = {
        "fast": PathStats(build(fast_cfg, device, False, args.seed), device),
        "published-style": PathStats(build(published_cfg, device, True, args.seed), device),
    }
    for stats in paths.values():
        stats.count_flops()  # also the warm-up iteration
    if args.compile:
        compile_path(paths["fast"])
    graphs = compiled_graphs()
    time_paths(paths, args.iters)
    # Measured again after the timed iterations, the higher of the two: load from other jobs
    # only ever slows it down.
    matmuls = {name: max(rate, matmul_rate(device, dtypes[name])) for name, rate in matmuls.items()}
    figures = {name: stats.figures(matmuls) for name, stats in paths.items()}
    print_table(fast_cfg, device, precision, matmuls, args.iters, figures)
    if args.compile:
        print(
            f"compile: warm-up (compiling) iteration {paths['fast'].warmup_seconds:.1f} s; "
            f"graphs compiled during the {args.iters} timed iterations (recompiles): "
            f"{compiled_graphs() - graphs}"
        )
    if args.profile:
        profile(paths["fast"].distiller, device)
    return figures


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    args = arguments(argv)
    setting = args.setting or ("small" if args.small else "cifar10")
    overrides = [*SETTINGS[setting], f"runtime.device={args.device}"]
    if args.agreement:
        return agreement(bench_config(overrides), resolve_device(args.device), args.generator)
    if args.batch_size:
        overrides.append(f"trainer.batch_size={args.batch_size}")
    if args.student_steps:
        overrides.append(f"trainer.student_steps={args.student_steps}")
    fast_cfg = bench_config([*overrides, f"speed.precision={args.precision}", *args.set])
    published_cfg = bench_config([*overrides, *PUBLISHED_STYLE])
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    thread_counts = [None] if device.type == "cuda" else args.threads
    figures: dict[str, dict[str, float | None]] = {}
    for threads in thread_counts:
        if threads is not None:
            torch.set_num_threads(threads)
        figures = time_setting(fast_cfg, published_cfg, device, precision, args)
    return figures


if __name__ == "__main__":
    main()
