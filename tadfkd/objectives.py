"""What each method minimises: one objective for the generator, one for the student.

Methods differ only here (and in their ``selection`` choice); the loop in ``tadfkd.distill`` is
shared. A method is a config in ``conf/method/`` naming this class with its loss weights; a
method whose terms are not a weighted sum of the ones below adds one small subclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from tadfkd import losses
from tadfkd.errors import UserError

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
    """Everything a generator objective may use from one generator step.

    ``images`` is the whole train view (B, C, H, W); the logits and features are those of the
    samples the selection kept; ``bn_statistics`` is the teacher's BN term on those samples.
    """

    images: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    bn_statistics: torch.Tensor | None
    teacher_features: torch.Tensor | None


class Objective:
    """Weighted sum of generator terms and a student distillation loss.

    ``weights`` maps each name of ``GENERATOR_TERMS`` to its weight (missing names weigh 0);
    ``adversarial`` names the discrepancy the generator maximises and ``student_loss`` the one
    the student minimises; ``temperature`` is the softmax temperature of the divergences (JS and
    KL; the L1 terms compare raw logits). ``detach_teacher`` stops the adversarial term's
    gradient at the teacher's logits, as the published ``basic`` branch does (its selection
    branch lets it reach the generator through the teacher too); the other terms keep theirs.
    """

    def __init__(
        self,
        name: str,
        student_loss: str = "l1",
        adversarial: str = "js",
        temperature: float = 3.0,
        weights: Mapping[str, float] | None = None,
        detach_teacher: bool = False,
    ) -> None:
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

    def attach(self, teacher: nn.Module, student: nn.Module) -> None:
        """Register whatever forward hooks the objective needs (none for a weighted sum)."""

    @property
    def needs_bn_statistics(self) -> bool:
        return self.weights["bn"] != 0.0

    @property
    def needs_teacher_features(self) -> bool:
        return self.weights["activation"] != 0.0

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
            terms["bn"] = batch.bn_statistics
        if w["tv"]:
            terms["tv"] = losses.total_variation(batch.images)
        if w["l2"]:
            terms["l2"] = losses.l2_prior(batch.images)
        if w["class_prior"]:
            terms["class_prior"] = losses.class_prior(batch.teacher_logits)
        if w["activation"]:
            terms["activation"] = losses.activation_loss(batch.teacher_features)
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
        self._recorders: dict[str, _StageOutputs] = {}

    def attach(self, teacher: nn.Module, student: nn.Module) -> None:
        self._recorders = {"teacher": _StageOutputs(teacher), "student": _StageOutputs(student)}

    def student(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms = super().student(student_logits, teacher_logits)
        teacher_maps = self._recorders["teacher"].by_resolution()
        student_maps = self._recorders["student"].by_resolution()
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


class _StageOutputs:
    """Outputs of the last-finishing module at each spatial resolution of a network."""

    def __init__(self, model: nn.Module) -> None:
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._handles = [
            module.register_forward_hook(self._record)
            for name, module in model.named_modules()
            # the root's output is the logits; a normalisation layer ends no stage
            if name and not isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]

    def _record(self, _module: nn.Module, _inputs, output) -> None:
        if torch.is_tensor(output) and output.dim() == 4:
            # Hooks fire as modules finish, so the last write per size is the stage's end.
            self._outputs[tuple(output.shape[-2:])] = output

    def by_resolution(self) -> dict[tuple[int, int], torch.Tensor]:
        """The recorded stage ends of the most recent forward, keyed by (H, W)."""
        outputs, self._outputs = self._outputs, {}
        return outputs
