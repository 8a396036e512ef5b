"""Loss terms as objects, built from a method's YAML by ``_target_``.

A generator term is a ``GeneratorTerm``: its ``weight``, the forward hooks it needs on the
teacher (``attach``) and its unweighted value on a ``GeneratorBatch``; the objective sums the
weighted terms in the order the YAML lists them. A student loss is a ``StudentLoss``. A new term
is one subclass (here or in any importable module) and one line in ``conf/method/``:

    generator_terms:
      bn: {_target_: tadfkd.distillation.terms.BNStatistics, weight: 10.0}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from tadfkd.distillation import losses
from tadfkd.distillation.recorders import ForwardHooks, bn_statistics_term, paths_of
from tadfkd.models import classifier_layer, module_path


@dataclass
class GeneratorBatch:
    """What the loop hands a generator objective from one generator step: the whole train view
    ``images`` (B, C, H, W) and the logits (N, K) of the samples the selection kept, from the
    teacher's and the student's forward on them (the teacher's hooks recorded that forward)."""

    images: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor


class GeneratorTerm(ABC):
    """One weighted term of the generator's loss; a weight of 0 leaves it out (not computed)."""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)
        self.hooks: ForwardHooks | None = None

    def attach(self, hooks: ForwardHooks) -> None:
        """Keep ``hooks`` (of the teacher's generator-step forward, the one with gradients);
        a term that reads a recording overrides this to register there what ``value`` reads."""
        self.hooks = hooks

    @abstractmethod
    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        """The unweighted term, a scalar tensor."""


class StudentLoss(ABC):
    """The discrepancy the student minimises between its logits and the teacher's (N, K)."""

    @abstractmethod
    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        """The loss, a scalar tensor."""


class StudentL1(StudentLoss):
    """``losses.student_l1`` on raw logits (TA-DFKD, DFAD)."""

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return losses.student_l1(student_logits, teacher_logits)


class StudentKL(StudentLoss):
    """``losses.student_kl`` at softmax ``temperature`` (DAFL, DFQ)."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return losses.student_kl(student_logits, teacher_logits, temperature=self.temperature)


class StudentKLElementMean(StudentKL):
    """``losses.student_kl_element_mean`` at softmax ``temperature`` (ZSKT)."""

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return losses.student_kl_element_mean(
            student_logits, teacher_logits, temperature=self.temperature
        )


class Adversarial(GeneratorTerm):
    """A discrepancy of student and teacher logits whose minimum is their disagreement.
    ``detach_teacher`` stops its gradient at the teacher's logits (the published ``basic``
    branch; its selection branch lets it reach the generator through the teacher too)."""

    def __init__(self, weight: float, detach_teacher: bool = False) -> None:
        super().__init__(weight)
        self.detach_teacher = detach_teacher

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        teacher_logits = batch.teacher_logits
        if self.detach_teacher:
            teacher_logits = teacher_logits.detach()
        return self.discrepancy(batch.student_logits, teacher_logits)

    @abstractmethod
    def discrepancy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        """The term on logits (N, K), a scalar tensor."""


class AdversarialL1(Adversarial):
    """``losses.adversarial_l1`` on raw logits (DFAD)."""

    def discrepancy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return losses.adversarial_l1(student_logits, teacher_logits)


class TemperedAdversarial(Adversarial):
    """An adversarial divergence of softmax(logits / ``temperature``)."""

    def __init__(self, weight: float, temperature: float = 1.0, detach_teacher: bool = False):
        super().__init__(weight, detach_teacher)
        self.temperature = temperature


class AdversarialJS(TemperedAdversarial):
    """``losses.adversarial_js``, the published "JS" term (TA-DFKD; it runs at T = 3)."""

    def discrepancy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return losses.adversarial_js(student_logits, teacher_logits, temperature=self.temperature)


class AdversarialKL(TemperedAdversarial):
    """``losses.adversarial_kl``, -KL batch mean (the CMI benchmark's DFQ)."""

    def discrepancy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return losses.adversarial_kl(student_logits, teacher_logits, temperature=self.temperature)


class AdversarialKLElementMean(TemperedAdversarial):
    """``losses.adversarial_kl_element_mean``, -KL over all N x K entries (ZSKT)."""

    def discrepancy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return losses.adversarial_kl_element_mean(
            student_logits, teacher_logits, temperature=self.temperature
        )


class BNStatistics(GeneratorTerm):
    """DeepInversion's term summed over the teacher's BatchNorm2d layers, from hooks on their
    inputs in the generator step's forward (``statistic``: ``recorders.bn_statistics_term``)."""

    statistic = staticmethod(bn_statistics_term)

    def attach(self, hooks: ForwardHooks) -> None:
        super().attach(hooks)
        self.paths = paths_of(hooks.model, nn.BatchNorm2d)
        for path in self.paths:
            hooks.add(path, "input", self.statistic, with_grad_only=True)

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return torch.stack([self.hooks[path] for path in self.paths]).sum()


class Activation(GeneratorTerm):
    """``losses.activation_loss`` of the teacher's penultimate features, recorded at its
    classifier's input (DAFL)."""

    def attach(self, hooks: ForwardHooks) -> None:
        super().attach(hooks)
        self.path = module_path(hooks.model, classifier_layer(hooks.model))
        hooks.add(self.path, "input", with_grad_only=True)

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return losses.activation_loss(self.hooks[self.path])


class TotalVariation(GeneratorTerm):
    """``losses.total_variation`` of the train view (an image prior)."""

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return losses.total_variation(batch.images)


class L2Prior(GeneratorTerm):
    """``losses.l2_prior`` of the train view (an image prior)."""

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return losses.l2_prior(batch.images)


class ClassPrior(GeneratorTerm):
    """``losses.class_prior`` of the teacher's logits (DAFL's one-hot loss)."""

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return losses.class_prior(batch.teacher_logits)


class InformationEntropy(GeneratorTerm):
    """``losses.information_entropy`` of the teacher's logits (DAFL, base-10 logarithms)."""

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return losses.information_entropy(batch.teacher_logits)


class ClassBalance(GeneratorTerm):
    """``losses.class_balance`` of the teacher's logits (the CMI benchmark's DFQ, in nats)."""

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return losses.class_balance(batch.teacher_logits)
