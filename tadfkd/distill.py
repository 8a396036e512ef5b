"""The one distillation loop: generate -> select -> student steps -> generator step -> evaluate.

Every method runs through ``Distiller``; methods differ only in their ``Objective`` and in their
selection (``GMMSelection`` or ``NoSelection``).
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tadfkd.errors import NonFiniteLoss, UserError
from tadfkd.hooks import BNStatistics, LayerInputs
from tadfkd.models import classifier_layer
from tadfkd.objectives import GeneratorBatch, Objective
from tadfkd.precision import Precision
from tadfkd.selection import GMMSelection, NoSelection, fill_order
from tadfkd.views import Views


@dataclass
class Schedule:
    """How long and in what rhythm to train (the names of ``trainer.*`` in the config)."""

    epochs: int
    iters_per_epoch: int = 36
    student_steps: int = 10
    batch_size: int = 1024
    nz: int = 1000
    # The reference steps the cosine schedule at the start of each epoch (one step early).
    published_scheduler_offset: bool = False
    # A NaN or infinite loss term: "stop" the run (NonFiniteLoss) or "skip" that step, counted.
    on_nonfinite: str = "stop"


class EpochMeter:
    """Running sums of scalar tensors, read (with one host synchronisation) at the epoch end."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + (
                value.detach().float() if torch.is_tensor(value) else value
            )
            self.counts[name] += 1

    def means(self) -> dict[str, float]:
        return {name: float(total) / self.counts[name] for name, total in self.sums.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, as a fraction in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        correct += (model(images).argmax(dim=1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    return float(correct) / max(total, 1)


class Distiller:
    """Trains ``student`` to imitate ``teacher`` on samples of ``generator``, with no real data."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        generator: nn.Module,
        views: Views,
        selection: GMMSelection | NoSelection,
        objective: Objective,
        student_optimizer: torch.optim.Optimizer,
        generator_optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        schedule: Schedule,
        device: torch.device,
        precision: Precision | None = None,
    ) -> None:
        self.teacher = teacher.eval()
        self.student = student.train()
        self.generator = generator.train()
        self.views = views
        self.selection = selection
        self.objective = objective
        self.student_optimizer = student_optimizer
        self.generator_optimizer = generator_optimizer
        self.scheduler = scheduler
        self.schedule = schedule
        self.device = device
        self.precision = precision or Precision("fp32", device)
        # Kept fraction of the generated samples of the last refill: sizes the next round.
        self.selection_rate: float | None = None
        self.bn_statistics = BNStatistics(teacher) if objective.needs_bn_statistics else None
        self.teacher_features = (
            LayerInputs(classifier_layer(teacher)) if objective.needs_teacher_features else None
        )
        objective.attach(teacher, student)
        self.meter = EpochMeter()
        # Progress, saved by state_dict: completed epochs, completed iterations of the current
        # epoch, and every finished epoch's metrics (its test accuracy included).
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict[str, float | None]] = []
        self.stop_reason: str | None = None

    # -- sampling -------------------------------------------------------------------------
    def generate(self, n: int) -> torch.Tensor:
        """``n`` generated images in [0, 1], (n, C, H, W), float32.

        Never autocast: the images decide the selection (see ``keep_mask``).
        """
        z = torch.randn(n, self.schedule.nz, device=self.device)
        return self.generator(z)

    def keep_mask(self, images: torch.Tensor) -> torch.Tensor:
        """Selection on the test view of generated batches; all-true without selection.

        ``images`` holds one or more whole generated batches (N a multiple of ``batch_size``):
        one teacher forward scores them all, and one mixture is fitted per batch, as if each
        batch had been selected on its own (the teacher is in eval mode). Never autocast: the
        min-max normalised losses amplify bf16 rounding, which flips ~7% of the keep decisions
        of a trained digits teacher; in fp32 the kept set does not depend on ``precision``.
        """
        if not self.selection.enabled:
            return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        with torch.no_grad():
            logits = self.teacher(self.views.test_view(images))
        return self.selection.keep_mask(logits, self.schedule.batch_size)

    def batches_per_round(self, needed: int) -> int:
        """Generated batches to score together for ``needed`` more kept samples.

        Just enough for ``needed`` at the last refill's selection rate, rounded up (one batch
        while no rate is known); a shortfall costs one more, smaller round, a margin would cost
        unused batches every step. The caller applies the bound ``selection.max_batches``.
        """
        if self.selection_rate is None:
            return 1
        expected_kept = self.selection_rate * self.schedule.batch_size
        if expected_kept <= 0:
            return self.selection.max_batches
        return max(1, math.ceil(needed / expected_kept))

    @torch.no_grad()
    def student_batch(self) -> torch.Tensor:
        """Train views of kept samples, refilled from fresh batches until ``batch_size`` are kept.

        Batches are generated one by one (the generator's BatchNorm uses per-batch statistics),
        then scored together in rounds of ``batches_per_round`` batches, with one host
        synchronisation a round. The student batch is exactly the reference's: every kept
        sample of batches 1..j-1 and a random subset of batch j's, where j is the first batch
        that completes it; batches generated beyond j are counted but not used. At most
        ``selection.max_batches`` batches are generated; if they keep fewer samples the student
        trains on what was kept (counted as ``short_student_batches``), and if they keep none at
        all the run stops with a clear error.
        """
        size, limit = self.schedule.batch_size, self.selection.max_batches
        images, keeps, kept_per_batch = [], [], []
        while sum(kept_per_batch) < size and len(images) < limit:
            count = min(self.batches_per_round(size - sum(kept_per_batch)), limit - len(images))
            batches = [self.generate(size) for _ in range(count)]
            keep = self.keep_mask(torch.cat(batches))
            images += batches
            keeps.append(keep)
            kept_per_batch += keep.view(count, size).sum(dim=1).tolist()
            self.selection_rate = sum(kept_per_batch) / (size * len(images))
        kept = sum(kept_per_batch)
        running, used = 0, len(images)
        for index, count in enumerate(kept_per_batch):
            running += count
            if running >= size:
                used = index + 1
                break
        self.meter.add(
            {
                "selection/generated": float(size * len(images)),
                "selection/kept": float(kept),
                "selection/batches_used": float(used),
            }
        )
        if kept == 0:
            raise UserError(
                f"selection kept no generated sample in {len(images)} batches of {size}, so the "
                "student has nothing to learn from; lower selection.threshold, raise "
                "selection.max_batches, or use selection=none."
            )
        if kept < size:
            self.meter.add({"selection/short_student_batches": 1.0})
        index = fill_order(torch.cat(keeps)[: used * size], size)
        return torch.cat([self.views.train_view(batch) for batch in images[:used]])[index]

    # -- steps ----------------------------------------------------------------------------
    def student_step(self) -> None:
        images = self.student_batch()
        with self.precision.autocast():
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss, terms = self.objective.student(self.student(images), teacher_logits)
        self.student_optimizer.zero_grad(set_to_none=True)
        if not self.all_finite("student", {"student": loss, **terms}):
            return
        self.precision.step(loss, self.student_optimizer)
        self.meter.add({f"loss/{name}": value for name, value in terms.items()})

    def generator_step(self) -> None:
        size = self.schedule.batch_size
        images = self.generate(size)
        keep = self.keep_mask(images.detach())
        train_view = self.views.train_view(images)
        kept = train_view[keep] if self.selection.enabled else train_view
        if kept.shape[0] < 2:
            # Batch statistics and divergences need at least two samples; skip and count it.
            self.meter.add({"selection/skipped_generator_steps": 1.0})
            return
        self.student.requires_grad_(False)  # the generator step needs no student weight grads
        try:
            with self.precision.autocast():
                if self.bn_statistics is not None:
                    self.bn_statistics.enabled = True
                teacher_logits = self.teacher(kept)
                if self.bn_statistics is not None:
                    self.bn_statistics.enabled = False
                student_logits = self.student(kept)
            batch = GeneratorBatch(
                images=train_view,
                student_logits=student_logits,
                teacher_logits=teacher_logits,
                bn_statistics=self.bn_statistics.loss() if self.bn_statistics else None,
                teacher_features=self.teacher_features.value if self.teacher_features else None,
            )
            loss, terms = self.objective.generator(batch)
            self.generator_optimizer.zero_grad(set_to_none=True)
            if not self.all_finite("generator", {"generator": loss, **terms}):
                return
            self.precision.step(loss, self.generator_optimizer)
        finally:
            self.student.requires_grad_(True)
        self.meter.add({"loss/generator": loss, **{f"loss/{k}": v for k, v in terms.items()}})

    def all_finite(self, step: str, terms: dict[str, torch.Tensor]) -> bool:
        """Whether every loss term of a ``step`` ("student" or "generator") is finite.

        If not, the run stops with ``NonFiniteLoss`` naming the terms, the epoch and the
        iteration, or (``on_nonfinite=skip``) the caller skips the step, counted as
        ``nonfinite/skipped_<step>_steps``. One host synchronisation per step, for all terms.
        """
        names = [name for name, value in terms.items() if torch.is_tensor(value)]
        finite = torch.isfinite(torch.stack([terms[name].detach().float() for name in names]))
        if bool(finite.all()):
            return True
        bad = [name for name, ok in zip(names, finite.tolist(), strict=True) if not ok]
        if self.schedule.on_nonfinite == "skip":
            self.meter.add({f"nonfinite/skipped_{step}_steps": 1.0})
            return False
        raise NonFiniteLoss(
            f"the {step} loss became non-finite (term {', '.join(bad)}) at epoch "
            f"{self.epoch + 1}, iteration {self.iteration + 1}"
        )

    # -- epochs ---------------------------------------------------------------------------
    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """Data-free health signals on a fresh generated batch (no real data needed).

        ``teacher_class_entropy``: entropy of the teacher's arg-max class histogram as a fraction
        of its maximum log(K); ``teacher_confidence``: mean max softmax probability;
        ``agreement``: fraction of samples where student and teacher arg-max agree.
        """
        self.student.eval()
        try:
            test_view = self.views.test_view(self.generate(self.schedule.batch_size))
            with self.precision.autocast():
                teacher_logits = self.teacher(test_view).float()
                student_logits = self.student(test_view).float()
        finally:
            self.student.train()
        num_classes = teacher_logits.shape[1]
        predicted = teacher_logits.argmax(dim=1)
        histogram = torch.bincount(predicted, minlength=num_classes).float()
        p = histogram / histogram.sum()
        entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(num_classes)
        return {
            "health/teacher_class_entropy": float(entropy),
            "health/teacher_confidence": float(F.softmax(teacher_logits, 1).amax(1).mean()),
            "health/agreement": float((student_logits.argmax(1) == predicted).float().mean()),
        }

    def train_epoch(self, epoch: int, progress: bool = True) -> dict[str, float]:
        """One epoch of ``iters_per_epoch`` x (``student_steps`` student steps + 1 generator step).

        Returns the epoch's mean of every logged scalar plus the selection rate (kept/generated).
        """
        if self.iteration == 0:
            self.meter = EpochMeter()
        schedule = self.schedule
        bar = tqdm(
            range(self.iteration, schedule.iters_per_epoch),
            desc=f"epoch {epoch + 1}/{schedule.epochs}",
            leave=False,
            disable=not (progress and sys.stderr.isatty()),
            mininterval=1.0,
        )
        for iteration in bar:
            if self.stop_reason is not None:
                bar.close()
                return None
            for _ in range(schedule.student_steps):
                self.student_step()
            self.generator_step()
            self.iteration = iteration + 1
        means = self.meter.means()
        sums = {name: float(total) for name, total in self.meter.sums.items()}
        generated = sums.pop("selection/generated", 0.0)
        kept = sums.pop("selection/kept", 0.0)
        means.pop("selection/generated", None)
        means.pop("selection/kept", None)
        for counter in (
            "selection/short_student_batches",
            "selection/skipped_generator_steps",
            "nonfinite/skipped_student_steps",
            "nonfinite/skipped_generator_steps",
        ):
            means[counter] = sums.get(counter, 0.0)
        means["selection/rate"] = kept / generated if generated else 1.0
        means["lr/student"] = self.student_optimizer.param_groups[0]["lr"]
        return means

    def fit(
        self,
        test_loader: Iterable | None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> list[float | None]:
        """Train until ``schedule.epochs`` epochs are done, evaluating the student after each;
        starts where ``load_state_dict`` left off (mid-epoch included).

        Returns the per-epoch test accuracies (fractions); ``on_epoch_end(epoch, metrics)`` is
        called with the epoch's metrics (losses, selection, health, ``acc/student``), then
        ``on_checkpoint()`` when the state is worth saving: after every epoch, and when
        ``request_stop`` was called, after the current iteration (``finished`` is then false).
        """
        while self.epoch < self.schedule.epochs:
            if self.stop_reason is not None:
                if on_checkpoint is not None:
                    on_checkpoint()
                break
            epoch = self.epoch
            start = time.perf_counter()
            if self.iteration == 0 and self.schedule.published_scheduler_offset:
                self.scheduler.step()
            metrics = self.train_epoch(epoch, progress)
            if metrics is None:  # stop requested mid-epoch: checkpointed at the loop's top
                continue
            metrics.update(self.health())
            if test_loader is not None:  # None: no test set, nothing is measured
                metrics["acc/student"] = evaluate(self.student, test_loader, self.device)
            else:
                metrics["acc/student"] = None
            if not self.schedule.published_scheduler_offset:
                self.scheduler.step()
            metrics["time/epoch_s"] = time.perf_counter() - start
            self.history.append({"epoch": epoch + 1, **metrics})
            self.epoch, self.iteration = epoch + 1, 0
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if on_checkpoint is not None:
                on_checkpoint()
        return self.accuracies

    @property
    def accuracies(self) -> list[float | None]:
        """Test accuracy (fraction, None without a test set) of every finished epoch."""
        return [metrics["acc/student"] for metrics in self.history]

    @property
    def finished(self) -> bool:
        """Whether all ``schedule.epochs`` epochs are done."""
        return self.epoch >= self.schedule.epochs

    def request_stop(self, reason: str) -> None:
        """Ask ``fit`` to stop after the current iteration (safe to call from a signal handler)."""
        self.stop_reason = reason

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the rest of the run, except the RNG states: networks,
        optimisers, scheduler, progress (epoch, iteration, the current epoch's running sums)
        and history. Tensors and plain values only (loadable with ``weights_only=True``)."""
        return {
            "student": self.student.state_dict(),
            "generator": self.generator.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "selection_rate": self.selection_rate,
            "meter_sums": dict(self.meter.sums),
            "meter_counts": dict(self.meter.counts),
            "history": [dict(metrics) for metrics in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output (tensors are moved to this run's device)."""
        self.student.load_state_dict(state["student"])
        self.generator.load_state_dict(state["generator"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.selection_rate = state["selection_rate"]
        self.meter = EpochMeter()
        for name, total in state["meter_sums"].items():
            self.meter.sums[name] = total.to(self.device) if torch.is_tensor(total) else total
        self.meter.counts.update(state["meter_counts"])
        self.history = [dict(metrics) for metrics in state["history"]]
