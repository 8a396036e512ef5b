"""The synthesizer: the generator and everything between it and the student.

In the CMI / Fast-DFKD family's words it answers two requests: "give me a student batch"
(``student_batch``: generate, select, refill until a batch of kept samples is full) and "take a
generator step" (``generator_step``). It owns the generator and its optimiser, the two views of a
generated batch, the clean-sample selection, the sizing of refill rounds and the selection rate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.data.views import Inputs, Views
from tadfkd.distillation.nonfinite import NonFiniteGuard
from tadfkd.distillation.objectives import Objective
from tadfkd.distillation.precision import Precision, autocast_to
from tadfkd.distillation.selection import Selection, fill_order
from tadfkd.distillation.terms import GeneratorBatch

# test views of whole generated batches (N, C, H, W), N a multiple of the batch size -> keep (N,)
Scorer = Callable[[torch.Tensor], torch.Tensor]


class Synthesizer:
    """Generated samples for the student, and the generator's own training step.

    ``teacher`` is the frozen teacher of the generator step (its BN-statistics hooks and its
    gradient path); ``inference_teacher`` (default: ``teacher``) scores samples for the selection,
    e.g. a copy with BatchNorm folded (``tadfkd.teachers.folding``). ``scorer`` (default:
    ``score``) is the seam through which another selection implementation can be timed or
    tested. Refill rounds: ``adaptive_rounds=False`` generates one batch per round, as the
    reference does; ``bucket_rounds`` rounds each round's batch count up to a power of two, so
    that a GPU sees few distinct shapes. ``scoring_dtype`` (None: fp32) autocasts the scoring
    forward. ``guard`` checks the generator step's loss terms. ``inputs`` (default: TA-DFKD's)
    says which view and which modes the method's public code uses (``tadfkd.data.views.Inputs``).
    """

    def __init__(
        self,
        generator: nn.Module,
        generator_optimizer: torch.optim.Optimizer,
        teacher: nn.Module,
        views: Views,
        selection: Selection,
        batch_size: int,
        device: torch.device,
        precision: Precision | None = None,
        guard: NonFiniteGuard | None = None,
        inference_teacher: nn.Module | None = None,
        adaptive_rounds: bool = True,
        bucket_rounds: bool = False,
        scoring_dtype: torch.dtype | None = None,
        generation_dtype: torch.dtype | None = None,
        inputs: Inputs | None = None,
    ) -> None:
        self.generator = generator.train()
        self.optimizer = generator_optimizer
        self.teacher = teacher
        self.inference_teacher = inference_teacher if inference_teacher is not None else teacher
        self.views = views
        self.selection = selection
        self.batch_size = batch_size
        self.device = device
        self.precision = precision or Precision("fp32", device)
        self.guard = guard or NonFiniteGuard()
        self.scorer: Scorer = self.score
        self.adaptive_rounds = adaptive_rounds
        self.bucket_rounds = bucket_rounds
        self.scoring_dtype = scoring_dtype
        self.generation_dtype = generation_dtype
        self.nz = generator_input_size(generator)
        self.inputs = inputs or Inputs()
        if self.inputs.noise == "generator_step" and selection.enabled:
            raise UserError(
                "method.inputs.noise=generator_step reuses one noise batch, which a selection "
                "refill cannot; use selection=none or method.inputs.noise=fresh."
            )
        # the generator step's noise, reused by the student batches when inputs.noise says so
        self.shared_noise: torch.Tensor | None = None
        # Kept fraction of the generated samples of the last refill: sizes the next round.
        self.selection_rate: float | None = None

    def generate(self, n: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` generated images in [0, 1], (n, C, H, W), float32, from fresh noise (or from
        ``noise`` (n, nz)), in the generator's current mode.

        In fp32 unless ``generation_dtype`` says otherwise (``speed.generation``): the images
        decide the selection (see ``score``), so a low-precision generator changes some keep
        decisions (docs/performance.md has the measured share).
        """
        z = torch.randn(n, self.nz, device=self.device) if noise is None else noise
        with autocast_to(self.device.type, self.generation_dtype):
            return self.generator(z).float()  # no copy when already fp32

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` images for the student (no gradients), with the generator in the method's
        ``inputs.sample_mode``; from the last generator step's noise when ``inputs.noise`` says
        so and there is one."""
        noise = self.shared_noise if self.inputs.noise == "generator_step" else None
        with mode(self.generator, self.inputs.sample_mode):
            if noise is not None and noise.shape[0] == n:
                return self.generate(n, noise)
            return self.generate(n)

    def student_view(self, images: torch.Tensor) -> torch.Tensor:
        """What the method's networks see of generated ``images`` in the student and generator
        steps: the train view when ``inputs.augment``, else the test view."""
        return (
            self.views.train_view(images) if self.inputs.augment else self.views.test_view(images)
        )

    @torch.no_grad()
    def scoring_logits(self, test_views: torch.Tensor) -> torch.Tensor:
        """The selection's teacher logits of generated test views: the inference teacher's
        forward, in fp32 unless ``scoring_dtype`` says otherwise (``speed.scoring``): the
        min-max normalised losses amplify bf16 rounding, which changes some keep decisions
        (docs/performance.md has the measured share)."""
        with autocast_to(self.device.type, self.scoring_dtype):
            return self.inference_teacher(test_views)

    @torch.no_grad()
    def score(self, test_views: torch.Tensor) -> torch.Tensor:
        """Keep mask (N,) of whole generated batches' test views: one teacher forward scores
        them all, and one mixture is fitted per batch, as if each batch had been selected on its
        own (the teacher is in eval mode)."""
        return self.scored(test_views)[0]

    @torch.no_grad()
    def scored(self, test_views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``score``'s keep mask (N,) and the teacher's logits (N, K) it was fitted to."""
        logits = self.scoring_logits(test_views)
        return self.selection.keep_mask(logits, self.batch_size), logits

    def keep_mask(self, images: torch.Tensor) -> torch.Tensor:
        """The selection on the test view of generated ``images`` (whole batches); all-true
        without selection."""
        if not self.selection.enabled:
            return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        return self.scorer(self.views.test_view(images))

    def batches_per_round(self, needed: int) -> int:
        """Generated batches to score together for ``needed`` more kept samples.

        Just enough for ``needed`` at the last refill's selection rate, rounded up (one batch
        while no rate is known, or always with ``adaptive_rounds=False``), and up to the next
        power of two with ``bucket_rounds``; a shortfall costs one more, smaller round, a margin
        would cost unused batches every step. The caller applies ``selection.max_batches``.
        """
        if self.selection_rate is None or not self.adaptive_rounds:
            return 1
        expected_kept = self.selection_rate * self.batch_size
        if expected_kept <= 0:
            return self.selection.max_batches
        count = max(1, math.ceil(needed / expected_kept))
        return 1 << (count - 1).bit_length() if self.bucket_rounds else count

    @torch.no_grad()
    def student_batch(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Train views of kept samples, refilled from fresh batches until ``batch_size`` are
        kept, and the refill's counters (summed per epoch, ``tadfkd.base.schema``).

        Batches are generated one by one (the generator's BatchNorm uses per-batch statistics),
        then scored together in rounds of ``batches_per_round`` batches, with one host
        synchronisation a round. The student batch is exactly the reference's: every kept
        sample of batches 1..j-1 and a random subset of batch j's, where j is the first batch
        that completes it; batches generated beyond j are counted but not used. At most
        ``selection.max_batches`` batches are generated; if they keep fewer samples the student
        trains on what was kept (counted as a short student batch), and if they keep none at all
        the run stops with a clear error.
        """
        size, limit = self.batch_size, self.selection.max_batches
        images, keeps, kept_per_batch = [], [], []
        while sum(kept_per_batch) < size and len(images) < limit:
            count = min(self.batches_per_round(size - sum(kept_per_batch)), limit - len(images))
            batches = [self.sample(size) for _ in range(count)]
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
        counters = {
            schema.GENERATED: float(size * len(images)),
            schema.KEPT: float(kept),
            schema.BATCHES_USED: float(used),
        }
        if kept == 0:
            self.guard.raise_if_nonfinite()  # NaN images keep nothing: name the NaN first
            raise UserError(
                f"selection kept no generated sample in {len(images)} batches of {size}, so the "
                "student has nothing to learn from; lower selection.threshold, raise "
                "selection.max_batches, or use selection=none."
            )
        if kept < size:
            counters[schema.SHORT_STUDENT_BATCHES] = 1.0
        index = fill_order(torch.cat(keeps)[: used * size], size)
        return torch.cat([self.student_view(batch) for batch in images[:used]])[index], counters

    def generator_step(self, student: nn.Module, objective: Objective) -> dict[str, Any]:
        """One generator step on a fresh batch, selected once (no refill): the teacher and the
        student (in ``inputs.student_mode``) see the kept student views; ``objective.generator``
        weighs the terms. Returns the step's metrics: its loss terms, or the counter of a
        skipped step."""
        noise = torch.randn(self.batch_size, self.nz, device=self.device)
        if self.inputs.noise == "generator_step":
            self.shared_noise = noise
        images = self.generate(self.batch_size, noise)
        keep = self.keep_mask(images.detach())
        train_view = self.student_view(images)
        kept = train_view[keep] if self.selection.enabled else train_view
        if kept.shape[0] < 2:
            # Batch statistics and divergences need at least two samples; skip and count it.
            return {schema.SKIPPED_GENERATOR_STEPS: 1.0}
        student.requires_grad_(False)  # the generator step needs no student weight gradients
        try:
            with self.precision.autocast():
                teacher_logits = self.teacher(kept)
                with mode(student, self.inputs.student_mode):
                    student_logits = student(kept)
            batch = GeneratorBatch(train_view, student_logits, teacher_logits)
            loss, terms = objective.generator(batch)
            self.optimizer.zero_grad(set_to_none=True)
            if not self.guard.all_finite("generator", {"generator": loss, **terms}):
                return {schema.SKIPPED_GENERATOR_STEPS_NONFINITE: 1.0}
            self.precision.step(loss, self.optimizer, "generator")
        finally:
            student.requires_grad_(True)
        return {schema.GENERATOR_LOSS: loss, **{schema.loss_key(k): v for k, v in terms.items()}}

    def state_dict(self) -> dict[str, Any]:
        """The generator, its optimiser, the selection rate and the shared noise (tensors and
        plain values)."""
        return {
            "generator": self.generator.state_dict(),
            "generator_optimizer": self.optimizer.state_dict(),
            "selection_rate": self.selection_rate,
            "shared_noise": self.shared_noise,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["generator_optimizer"])
        self.selection_rate = state["selection_rate"]
        noise = state.get("shared_noise")  # absent from checkpoints of older code
        self.shared_noise = None if noise is None else noise.to(self.device)


@contextlib.contextmanager
def mode(module: nn.Module, name: str) -> Iterator[None]:
    """``module`` in ``name`` mode ("train" or "eval") inside the block, its mode before after.
    When every submodule is in that mode already, nothing is set: ``nn.Module.train`` sets each
    submodule's flag through ``nn.Module.__setattr__``, a cost paid on every generated batch.
    The block itself must not switch modes (then nothing would switch them back)."""
    wanted = name == "train"
    if all(submodule.training == wanted for submodule in module.modules()):
        yield
        return
    before = module.training
    module.train(wanted)
    try:
        yield
    finally:
        module.train(before)


def generator_input_size(generator: nn.Module) -> int:
    """The noise size ``nz`` a generator takes: the input size of its first linear layer."""
    first = next(module for module in generator.modules() if isinstance(module, nn.Linear))
    return first.in_features
