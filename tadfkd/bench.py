"""Benchmark of the distillation loop against a published-style implementation, in one run.

    python -m tadfkd.bench            # published CIFAR-10 setting: ResNet-34 -> ResNet-18, B=1024
    python -m tadfkd.bench --small    # digits-sized models at batch 128: seconds on a CPU

Both paths train from the same random weights (no data or teacher file is needed) and are timed
in alternation, iteration by iteration, so that drift in a shared machine hits both alike:

- fast: this project's ``Distiller`` (autocast per ``--precision``, channels-last on CUDA,
  several generated batches scored in one teacher forward with one mixture per batch);
- published-style: fp32, teacher logits recomputed in chunks of 32 for the selection, the
  mixture fitted by scikit-learn on the CPU, one batch generated and selected at a time.

One iteration is ``student_steps`` student steps plus one generator step; an epoch is 36.
FLOPs are those torch's ``FlopCounterMode`` counts (convolutions and matrix products, forward
and backward), compared with a matmul rate this script measures on the same device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch.utils.flop_counter import FlopCounterMode

from tadfkd.distill import Distiller, EpochMeter, Schedule
from tadfkd.models import Generator, build_classifier
from tadfkd.objectives import Objective
from tadfkd.precision import Precision, prepare_model, resolve_precision
from tadfkd.selection import GMMSelection
from tadfkd.train import resolve_device
from tadfkd.views import Views

EPOCH_ITERS = 36
TADFKD_WEIGHTS = {"adversarial": 1.0, "bn": 10.0, "tv": 1.5e-5, "l2": 6e-3}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Setting:
    """Networks and rhythm of one benchmarked configuration."""

    teacher: str
    student: str
    channels: int
    image_size: int
    nz: int
    width: int
    batch_size: int
    student_steps: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool


CIFAR10 = Setting(
    "resnet34", "resnet18", 3, 32, 1000, 128, 1024, 10, CIFAR_MEAN, CIFAR_STD, 4, True
)
SMALL = Setting("digits_cnn", "digits_cnn_s", 1, 16, 100, 32, 128, 10, (0.5,), (0.5,), 2, False)


class PublishedStyleDistiller(Distiller):
    """The reference implementation's selection and refill, for timing only (never trained).

    One batch per refill round; the teacher's logits of the whole test view give the
    pseudo-labels, then the selection recomputes them in chunks of 32 and fits scikit-learn's
    ``GaussianMixture`` on the CPU, as the published code does.
    """

    def batches_per_round(self, needed: int) -> int:
        return 1

    def keep_mask(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            test_view = self.views.test_view(images)
            labels = self.teacher(test_view).argmax(dim=1)
            logits = torch.cat([self.teacher(chunk) for chunk in test_view.split(32)])
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        losses = losses.cpu().numpy().astype(np.float64)
        span = losses.max() - losses.min()
        if span == 0:  # the reference yields NaN here; keep everything instead
            return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        normalised = ((losses - losses.min()) / span).reshape(-1, 1)
        mixture = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4)
        mixture.fit(normalised)
        clean = mixture.predict_proba(normalised)[:, mixture.means_.argmin()]
        return torch.from_numpy(clean > self.selection.threshold).to(images.device)


def build(setting: Setting, device: torch.device, precision: str, published: bool, seed: int):
    """A ``Distiller`` (or the published-style one) with random-weight networks from ``seed``."""
    torch.manual_seed(seed)
    teacher = build_classifier(setting.teacher, 10, setting.channels).eval().requires_grad_(False)
    student = build_classifier(setting.student, 10, setting.channels)
    generator = Generator(setting.nz, setting.image_size, setting.channels, setting.width)
    if published:
        teacher, student, generator = (m.to(device) for m in (teacher, student, generator))
    else:
        teacher, student, generator = (
            prepare_model(m, device) for m in (teacher, student, generator)
        )
    student_optimizer = torch.optim.SGD(
        student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4
    )
    kind = PublishedStyleDistiller if published else Distiller
    return kind(
        teacher=teacher,
        student=student,
        generator=generator,
        views=Views(setting.mean, setting.std, setting.crop_padding, setting.flip),
        selection=GMMSelection(),
        objective=Objective("tadfkd", weights=TADFKD_WEIGHTS),
        student_optimizer=student_optimizer,
        generator_optimizer=torch.optim.Adam(generator.parameters(), lr=1e-3),
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(student_optimizer, T_max=200),
        schedule=Schedule(
            epochs=1,
            student_steps=setting.student_steps,
            batch_size=setting.batch_size,
            nz=setting.nz,
        ),
        device=device,
        precision=Precision("fp32" if published else precision, device),
    )


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iteration(distiller: Distiller) -> None:
    for _ in range(distiller.schedule.student_steps):
        distiller.student_step()
    distiller.generator_step()


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
        distiller.keep_mask = self._timed(distiller.keep_mask)

    def _timed(self, keep_mask: Callable[[torch.Tensor], torch.Tensor]):
        def timed_keep_mask(images: torch.Tensor) -> torch.Tensor:
            synchronise(self.device)
            start = time.perf_counter()
            keep = keep_mask(images)
            synchronise(self.device)
            self.selection_seconds += time.perf_counter() - start
            return keep

        return timed_keep_mask

    def count_flops(self) -> None:
        """FLOPs of one iteration, and of generating and scoring one extra batch."""
        distiller = self.distiller
        distiller.meter = EpochMeter()
        with FlopCounterMode(display=False) as counter:
            iteration(distiller)
        self.flops_per_iteration = counter.get_total_flops()
        self.counted_batches = self.batches_generated()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            distiller.keep_mask(distiller.generate(distiller.schedule.batch_size))
        self.flops_per_scored_batch = counter.get_total_flops()

    def batches_generated(self) -> float:
        """Batches generated in the student steps since the meter was last reset."""
        return float(self.distiller.meter.sums["selection/generated"]) / (
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
        iteration(self.distiller)
        synchronise(self.device)
        self.seconds.append(time.perf_counter() - start)
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    def figures(self, matmul: float) -> dict[str, float | None]:
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
        used = float(self.distiller.meter.sums["selection/batches_used"]) / iters
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
            "matmul_share": 100 * flops / per_iteration / matmul,
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
    ("matmul_share", "achieved rate / measured matmul rate", "%"),
)


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    parser = argparse.ArgumentParser(
        prog="python -m tadfkd.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--small", action="store_true", help="digits-sized models, batch 128")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per path")
    parser.add_argument("--batch-size", type=int, help="override the setting's batch size")
    parser.add_argument("--student-steps", type=int, help="override student steps per iteration")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", help="fast path: auto, fp32, bf16, fp16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    setting = SMALL if args.small else CIFAR10
    if args.batch_size:
        setting = replace(setting, batch_size=args.batch_size)
    if args.student_steps:
        setting = replace(setting, student_steps=args.student_steps)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    matmul_dtype = torch.float32 if precision == "fp32" else Precision(precision).dtype
    matmul = matmul_rate(device, matmul_dtype)

    paths = {
        "fast": PathStats(build(setting, device, precision, False, args.seed), device),
        "published-style": PathStats(build(setting, device, "fp32", True, args.seed), device),
    }
    for stats in paths.values():
        stats.count_flops()  # also the warm-up iteration
        stats.start_timing()
    for index in range(args.iters):
        order = list(paths.values())
        for stats in order if index % 2 == 0 else order[::-1]:
            stats.time_iteration()
    # Measured again after the timed iterations, the higher of the two: load from other jobs
    # only ever slows it down.
    matmul = max(matmul, matmul_rate(device, matmul_dtype))
    figures = {name: stats.figures(matmul) for name, stats in paths.items()}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name} ({torch.get_num_threads()} CPU threads); fast path precision "
        f"{precision}; {setting.teacher} -> {setting.student}, batch {setting.batch_size}, "
        f"{setting.student_steps} student steps + 1 generator step per iteration, generator "
        f"nz={setting.nz} width {setting.width} at {setting.image_size}px; "
        f"{args.iters} timed iterations per path after 1 counted warm-up"
    )
    print(
        f"measured matmul rate ({str(matmul_dtype).removeprefix('torch.')}): "
        f"{matmul / 1e12:.4g} TFLOP/s"
    )
    label_width = max(len(label) for _, label, _ in ROWS) + 2
    print(f"{'figure':<{label_width}}{'fast':>12}{'published-style':>17}  unit")
    for key, label, unit in ROWS:
        fast, published = figures["fast"][key], figures["published-style"][key]
        print(
            f"{label:<{label_width}}{format_value(fast):>12}{format_value(published):>17}  {unit}"
        )
    speedup = figures["published-style"]["s_per_iter"] / figures["fast"]["s_per_iter"]
    print(f"speed-up of fast over published-style (time per iteration): {speedup:.3g} x")
    return figures


if __name__ == "__main__":
    main()
