"""The one distillation loop: iterate (student steps, then a generator step), evaluate, stop.

Every method runs through ``Distiller``; methods differ only in their ``Objective`` and in their
selection. Where the student's samples come from, and the generator's step, is the
``Synthesizer``'s business (``tadfkd.distillation.synthesizer``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tadfkd.base import schema
from tadfkd.distillation.evaluation import evaluate, health_signals
from tadfkd.distillation.meter import EpochMeter
from tadfkd.distillation.objectives import Objective
from tadfkd.distillation.precision import Precision
from tadfkd.distillation.synthesizer import Synthesizer


@dataclass
class Schedule:
    """How long and in what rhythm to train (the names of ``trainer.*`` in the config)."""

    epochs: int
    iters_per_epoch: int
    student_steps: int
    batch_size: int
    # The reference steps the cosine schedule at the start of each epoch (one step early).
    published_scheduler_offset: bool


class Distiller:
    """Trains ``student`` to imitate ``teacher`` on the ``synthesizer``'s samples, no real data."""

    # What ``load_state_dict`` reads from a ``state_dict()`` (``grad_scalers`` and
    # ``shared_noise`` are optional: older checkpoints lack them); a checkpoint without one of
    # these is damaged.
    STATE_KEYS = (
        "student",
        "student_optimizer",
        "scheduler",
        "generator",
        "generator_optimizer",
        "selection_rate",
        "epoch",
        "iteration",
        "meter_sums",
        "meter_counts",
        "history",
    )

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        synthesizer: Synthesizer,
        objective: Objective,
        student_optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        schedule: Schedule,
        device: torch.device,
        precision: Precision | None = None,
    ) -> None:
        self.teacher = teacher.eval()
        # The teacher of the no-grad forwards (student steps, health): the synthesizer's scoring
        # one, e.g. with BatchNorm folded.
        self.inference_teacher = synthesizer.inference_teacher.eval()
        self.student = student.train()
        self.synthesizer = synthesizer
        self.objective = objective
        self.student_optimizer = student_optimizer
        self.scheduler = scheduler
        self.schedule = schedule
        self.device = device
        self.precision = precision or Precision("fp32", device)
        self.guard = synthesizer.guard
        objective.attach(teacher, student, self.inference_teacher)
        self.meter = EpochMeter()
        # Progress, saved by state_dict: completed epochs, completed iterations of the current
        # epoch, and every finished epoch's metrics (its test accuracy included).
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict[str, float | None]] = []
        self.stop_reason: str | None = None

    # -- steps ----------------------------------------------------------------------------
    def student_step(self) -> None:
        """One student step on a full batch of kept samples."""
        images, counters = self.synthesizer.student_batch()
        self.meter.add(counters)
        with self.precision.autocast():
            with torch.no_grad():
                teacher_logits = self.inference_teacher(images)
            loss, terms = self.objective.student(self.student(images), teacher_logits)
        self.student_optimizer.zero_grad(set_to_none=True)
        if not self.guard.all_finite("student", {"student": loss, **terms}):
            self.meter.add({schema.SKIPPED_STUDENT_STEPS_NONFINITE: 1.0})
            return
        self.precision.step(loss, self.student_optimizer, "student")
        self.meter.add({schema.loss_key(name): value for name, value in terms.items()})

    def iterate(self) -> None:
        """One iteration: ``student_steps`` student steps, then one generator step."""
        for _ in range(self.schedule.student_steps):
            self.student_step()
        self.meter.add(self.synthesizer.generator_step(self.student, self.objective))

    @torch.no_grad()
    def teacher_classes(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's class (N,) of generated ``images`` (N, C, H, W) in [0, 1]."""
        return self.inference_teacher(self.synthesizer.views.test_view(images)).argmax(dim=1)

    # -- epochs ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int, progress: bool = True) -> dict[str, float] | None:
        """The iterations of one epoch not yet done; returns the epoch's metrics (means of the
        steps' scalars, the counters, the selection rate, the learning rate), or None when a
        stop was requested before the epoch ended."""
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
            self.guard.epoch, self.guard.iteration = epoch, iteration
            self.iterate()
            self.iteration = iteration + 1
        self.guard.raise_if_nonfinite()
        metrics = self.meter.epoch_metrics()
        metrics[schema.LR_STUDENT] = self.student_optimizer.param_groups[0]["lr"]
        return metrics

    def fit(
        self,
        test_loader: Iterable | None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> list[float | None]:
        """Train until ``schedule.epochs`` epochs are done, evaluating the student after each
        (``test_loader`` None: nothing is measured); starts where ``load_state_dict`` left off
        (mid-epoch included).

        Returns the per-epoch test accuracies (fractions); ``on_epoch_end(epoch, metrics)`` is
        called with the epoch's metrics (losses, selection, health, ``acc/student``), then
        ``on_checkpoint()`` when the state is worth saving: after every epoch, and when
        ``request_stop`` was called, after the current iteration (``finished`` is then false).
        """
        while self.epoch < self.schedule.epochs:
            if self.stop_reason is not None:
                self.guard.raise_if_nonfinite()  # a non-finite state is never checkpointed
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
            fresh = self.synthesizer.sample(self.schedule.batch_size)
            test_view = self.synthesizer.views.test_view(fresh)
            teacher = self.inference_teacher
            metrics.update(health_signals(teacher, self.student, test_view, self.precision))
            metrics[schema.STUDENT_ACC] = (
                evaluate(self.student, test_loader, self.device)
                if test_loader is not None
                else None
            )
            if not self.schedule.published_scheduler_offset:
                self.scheduler.step()
            metrics[schema.EPOCH_SECONDS] = time.perf_counter() - start
            self.history.append({schema.EPOCH: epoch + 1, **metrics})
            self.epoch, self.iteration = epoch + 1, 0
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if on_checkpoint is not None:
                on_checkpoint()
        return self.accuracies

    @property
    def accuracies(self) -> list[float | None]:
        """Test accuracy (fraction, None without a test set) of every finished epoch."""
        return [metrics[schema.STUDENT_ACC] for metrics in self.history]

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
            "student_optimizer": self.student_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.synthesizer.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            **self.meter.state_dict(),
            "history": [dict(metrics) for metrics in self.history],
            "grad_scalers": self.precision.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output (tensors are moved to this run's device)."""
        self.student.load_state_dict(state["student"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.synthesizer.load_state_dict(state)
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.meter = EpochMeter()
        self.meter.load_state_dict(state, self.device)
        self.history = [dict(metrics) for metrics in state["history"]]
        self.precision.load_state_dict(state.get("grad_scalers", {}))
