"""What each method minimises: one objective for the generator, one for the student.

Methods differ only here (and in their ``selection`` choice); the loop in ``loop`` is
shared. A method is a config in ``conf/method/`` naming this class with its loss weights; a
method whose terms are not a weighted sum of the ones below adds one small subclass. Each
objective registers the forward hooks its terms need in ``attach`` (``recorders``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from tadfkd.base.errors import UserError
from tadfkd.data.views import Inputs
from tadfkd.distillation import losses
from tadfkd.distillation.recorders import ForwardHooks, bn_statistics_term, paths_of
from tadfkd.models import classifier_layer, module_path

STUDENT_LOSSES = {
    "l1": losses.student_l1,
    "kl": losses.student_kl,
    "kl_element_mean": losses.student_kl_element_mean,
}
ADVERSARIAL_LOSSES = {
    "js": losses.adversarial_js,
    "l1": losses.adversarial_l1,
    "kl": losses.adversarial_kl,
    "kl_element_mean": losses.adversarial_kl_element_mean,
}
GENERATOR_TERMS = (
    "adversarial",
    "bn",
    "tv",
    "l2",
    "class_prior",
    "activation",
    "info_entropy",
    "balance",
)


def _tempered(loss, name: str, temperature: float):
    """Bind the temperature of a divergence; the L1 terms work on raw logits."""
    return loss if name == "l1" else partial(loss, temperature=temperature)


@dataclass
class GeneratorBatch:
    """What the loop hands a generator objective from one generator step: the whole train view
    ``images`` (B, C, H, W) and the logits (N, K) of the samples the selection kept, from the
    teacher's and the student's forward on them (the teacher's hooks recorded that forward)."""

    images: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor


class Objective:
    """Weighted sum of generator terms and a student distillation loss.

    ``weights`` maps each name of ``GENERATOR_TERMS`` to its weight (missing names weigh 0);
    ``adversarial`` names the discrepancy the generator maximises and ``student_loss`` the one
    the student minimises; ``temperature`` is the softmax temperature of the divergences (JS and
    KL; the L1 terms compare raw logits). ``detach_teacher`` stops the adversarial term's
    gradient at the teacher's logits, as the published ``basic`` branch does (its selection
    branch lets it reach the generator through the teacher too); the other terms keep theirs.
    ``inputs`` says which view of the generated images, in which modes, the networks see, as the
    method's public code feeds them (``tadfkd.data.views.Inputs``; default: TA-DFKD's).
    """

    def __init__(
        self,
        name: str,
        student_loss: str = "l1",
        adversarial: str = "js",
        temperature: float = 3.0,
        weights: Mapping[str, float] | None = None,
        detach_teacher: bool = False,
        inputs: Mapping[str, object] | None = None,
    ) -> None:
        inputs = dict(inputs or {})
        unknown_inputs = sorted(set(inputs) - set(Inputs.__dataclass_fields__))
        if unknown_inputs:
            raise UserError(
                f"method.inputs has unknown key(s) {unknown_inputs}; "
                f"known: {list(Inputs.__dataclass_fields__)}."
            )
        self.inputs = Inputs(**inputs)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(GENERATOR_TERMS))
        if unknown:
            raise UserError(
                f"method.weights has unknown term(s) {unknown}; known: {list(GENERATOR_TERMS)}."
            )
        if student_loss not in STUDENT_LOSSES:
            raise UserError(
                f"method.student_loss={student_loss!r} is unknown; "
                f"use one of {list(STUDENT_LOSSES)}."
            )
        if adversarial not in ADVERSARIAL_LOSSES:
            raise UserError(
                f"method.adversarial={adversarial!r} is unknown; "
                f"use one of {list(ADVERSARIAL_LOSSES)}."
            )
        self.name = name
        self.weights = {term: float(weights.get(term, 0.0)) for term in GENERATOR_TERMS}
        self._student_loss = _tempered(STUDENT_LOSSES[student_loss], student_loss, temperature)
        self._adversarial = _tempered(ADVERSARIAL_LOSSES[adversarial], adversarial, temperature)
        self.detach_teacher = detach_teacher
        self._teacher_hooks: ForwardHooks | None = None
        self._bn_paths: list[str] = []
        self._classifier_path = ""

    def attach(
        self, teacher: nn.Module, student: nn.Module, inference_teacher: nn.Module | None = None
    ) -> None:
        """Register the hooks the terms need. ``teacher`` runs the generator step's forward
        (the one with gradients): hooks on every BatchNorm2d's input statistics for ``bn``, and
        on the classifier's input (the penultimate features) for ``activation``.
        ``inference_teacher`` (default ``teacher``) runs the student steps' no-grad forwards."""
        hooks = self._teacher_hooks = ForwardHooks(teacher)
        if self.weights["bn"]:
            self._bn_paths = paths_of(teacher, nn.BatchNorm2d)
            for path in self._bn_paths:
                hooks.add(path, "input", bn_statistics_term, with_grad_only=True)
        if self.weights["activation"]:
            self._classifier_path = module_path(teacher, classifier_layer(teacher))
            hooks.add(self._classifier_path, "input", with_grad_only=True)

    def bn_statistics(self) -> torch.Tensor:
        """The BN-statistics term (DeepInversion), summed over the teacher's BatchNorm2d layers,
        of its last forward with gradients."""
        return torch.stack([self._teacher_hooks[path] for path in self._bn_paths]).sum()

    def student(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student loss on kept samples: (loss, {term name: unweighted value})."""
        loss = self._student_loss(student_logits, teacher_logits)
        return loss, {"student": loss}

    def generator(self, batch: GeneratorBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator loss: (weighted sum, {term name: unweighted value}) for non-zero weights."""
        terms: dict[str, torch.Tensor] = {}
        w = self.weights
        if w["adversarial"]:
            teacher_logits = batch.teacher_logits
            if self.detach_teacher:
                teacher_logits = teacher_logits.detach()
            terms["adversarial"] = self._adversarial(batch.student_logits, teacher_logits)
        if w["bn"]:
            terms["bn"] = self.bn_statistics()
        if w["tv"]:
            terms["tv"] = losses.total_variation(batch.images)
        if w["l2"]:
            terms["l2"] = losses.l2_prior(batch.images)
        if w["class_prior"]:
            terms["class_prior"] = losses.class_prior(batch.teacher_logits)
        if w["activation"]:
            features = self._teacher_hooks[self._classifier_path]
            terms["activation"] = losses.activation_loss(features)
        if w["info_entropy"]:
            terms["info_entropy"] = losses.information_entropy(batch.teacher_logits)
        if w["balance"]:
            terms["balance"] = losses.class_balance(batch.teacher_logits)
        total = sum(w[name] * value for name, value in terms.items())
        return total, terms


class AttentionTransferObjective(Objective):
    """ZSKT (Micaelli and Storkey, 2019): the student also matches the teacher's spatial
    attention maps, weighted by ``attention_weight`` (their beta = 250).

    Layers are matched by spatial resolution on every student step: for each resolution that
    teacher and student share, the module that finishes last at that resolution (the end of a
    stage) in each network, BatchNorm layers excluded, so that a WideResNet's stages are its
    blocks' outputs as in ZSKT's code, not its final BN. This works for every registered
    architecture without a layer list.
    """

    def __init__(self, *args, attention_weight: float = 250.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attention_weight = attention_weight
        self._stages: dict[str, ForwardHooks] = {}

    def attach(
        self, teacher: nn.Module, student: nn.Module, inference_teacher: nn.Module | None = None
    ) -> None:
        super().attach(teacher, student, inference_teacher)
        frozen = teacher if inference_teacher is None else inference_teacher
        self._stages = {"teacher": stage_ends(frozen), "student": stage_ends(student)}

    def student(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms = super().student(student_logits, teacher_logits)
        teacher_maps = self._stages["teacher"].take()
        student_maps = self._stages["student"].take()
        shared = sorted(set(teacher_maps) & set(student_maps), reverse=True)
        if not shared:
            raise UserError(
                "method=zskt needs teacher and student stages of equal spatial size; "
                "these two networks share none."
            )
        attention = losses.attention_transfer(
            [student_maps[size] for size in shared], [teacher_maps[size] for size in shared]
        )
        terms["attention"] = attention
        return loss + self.attention_weight * attention, terms


def stage_ends(model: nn.Module) -> ForwardHooks:
    """Hooks recording, on every forward, the 4-D output of the last module to finish at each
    spatial resolution (hooks fire as modules finish), keyed by (H, W): the stage ends. The root
    (whose output is the logits) and normalisation layers (which end no stage) are skipped."""
    hooks = ForwardHooks(model)
    for name, module in model.named_modules():
        if name and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.add(
                name,
                transform=lambda _module, out: (
                    out if torch.is_tensor(out) and out.dim() == 4 else None
                ),
                key=lambda out: tuple(out.shape[-2:]),
            )
    return hooks
