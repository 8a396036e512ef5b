"""What each method minimises: one objective for the generator, one for the student.

Methods differ only here (and in their ``selection`` choice); the loop in ``loop`` is
shared. A method is a config in ``conf/method/`` naming this class with its loss terms
(``tadfkd.distillation.terms``, each a ``_target_`` with its weight); a method whose student
loss is not one of those adds one small subclass. Each objective registers the forward hooks
its terms need in ``attach`` (``recorders``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tadfkd.base.errors import UserError
from tadfkd.data.views import Inputs
from tadfkd.distillation import losses
from tadfkd.distillation.recorders import ForwardHooks
from tadfkd.distillation.terms import GeneratorBatch, GeneratorTerm, StudentLoss


def _kind(value: object) -> str:
    """How an error names what a config node built instead of a loss term."""
    if isinstance(value, Mapping):
        return "a node without a _target_"
    return (
        repr(value)
        if isinstance(value, int | float | str)
        else f"an instance of {type(value).__name__}"
    )


class Objective:
    """Weighted sum of generator terms and a student distillation loss.

    ``generator_terms`` maps each term's name (its metric key, ``loss/<name>``) to a
    ``GeneratorTerm``, summed in this order; terms of weight 0 are left out. ``student_loss`` is
    what the student minimises on kept samples. ``inputs`` says which view of the generated
    images, in which modes, the networks see, as the method's public code feeds them
    (``tadfkd.data.views.Inputs``; default: TA-DFKD's).
    """

    def __init__(
        self,
        name: str,
        student_loss: StudentLoss,
        generator_terms: Mapping[str, GeneratorTerm],
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
        if not isinstance(student_loss, StudentLoss):
            raise UserError(
                f"method.student_loss is {_kind(student_loss)}, not a student loss; name a "
                "subclass of tadfkd.distillation.terms.StudentLoss in its _target_."
            )
        for term_name, term in generator_terms.items():
            if not isinstance(term, GeneratorTerm):
                raise UserError(
                    f"method.generator_terms.{term_name} is {_kind(term)}, not a loss term; "
                    "name a subclass of tadfkd.distillation.terms.GeneratorTerm in its _target_."
                )
        self.name = name
        self.student_loss = student_loss
        self.terms = {key: term for key, term in generator_terms.items() if term.weight}

    def attach(
        self, teacher: nn.Module, student: nn.Module, inference_teacher: nn.Module | None = None
    ) -> None:
        """Register the hooks the terms need on ``teacher``, which runs the generator step's
        forward (the one with gradients), e.g. every BatchNorm2d's input statistics for
        ``BNStatistics``. ``inference_teacher`` (default ``teacher``) runs the student steps'
        no-grad forwards."""
        hooks = ForwardHooks(teacher)  # one set for all terms: each records what it reads
        for term in self.terms.values():
            term.attach(hooks)

    def student(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student loss on kept samples: (loss, {term name: unweighted value})."""
        loss = self.student_loss(student_logits, teacher_logits)
        return loss, {"student": loss}

    def generator(self, batch: GeneratorBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator loss: (weighted sum, {term name: unweighted value}), in the terms' order."""
        values = {key: term.value(batch) for key, term in self.terms.items()}
        total = sum(self.terms[key].weight * value for key, value in values.items())
        return total, values


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
                f"method={self.name} needs teacher and student stages of equal spatial size; "
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
