"""The extension points of the distillation algorithm, used from outside the package: a loss term
and a selection rule defined here, in this test module, plugged in by ``_target_`` from config
(this module is importable as ``test_extension_points``), with no edit of ``tadfkd/``."""

import pytest
import torch
from helpers import CPU, TinyTeacher, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.distillation.recorders import ForwardHooks, paths_of
from tadfkd.distillation.terms import GeneratorBatch, GeneratorTerm
from tadfkd.run.builder import build_distiller
from tadfkd.run.checks import check_rules
from tadfkd.teachers.loading import random_teacher

HERE = __name__  # the module name a ``_target_`` gives to reach the classes below


class FirstLayerEnergy(GeneratorTerm):
    """A term the package does not have: the mean square of the teacher's first convolution's
    output in the generator step's forward, recorded by a hook the term registers itself."""

    def attach(self, hooks: ForwardHooks) -> None:
        super().attach(hooks)
        self.path = paths_of(hooks.model, nn.Conv2d)[0]
        hooks.add(self.path, with_grad_only=True)

    def value(self, batch: GeneratorBatch) -> torch.Tensor:
        return self.hooks[self.path].float().pow(2).mean()


class KeepFirstHalf:
    """A selection rule the package does not have: keep the first half of every generated
    batch, recording the shapes it was asked about."""

    enabled = True

    def __init__(self, max_batches: int = 8) -> None:
        self.max_batches = max_batches
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def keep_mask(self, teacher_logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        self.calls.append((tuple(teacher_logits.shape), chunk_size))
        keep = torch.zeros(teacher_logits.shape[0] // chunk_size, chunk_size, dtype=torch.bool)
        keep[:, : chunk_size // 2] = True
        return keep.view(-1)


def generator_loss(method_node) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator loss of the objective ``method_node`` builds, on one fixed batch."""
    objective = instantiate(method_node)
    torch.manual_seed(0)
    teacher = TinyTeacher().eval().requires_grad_(False)
    objective.attach(teacher, nn.Identity())
    images = torch.rand(3, 1, 6, 6)
    return objective.generator(GeneratorBatch(images, torch.randn(3, 5), teacher(images)))


@pytest.mark.parametrize("method", ["tadfkd", "dfq", "dafl"])
def test_a_loss_term_added_from_config_adds_exactly_its_weighted_value(method):
    term = f"{{_target_:{HERE}.FirstLayerEnergy,weight:0.25}}"
    cfg = compose_config([f"method={method}", f"+method.generator_terms.energy={term}"])
    check_rules(cfg, "method")  # its weight is checked as any term's
    before, _ = generator_loss(compose_config([f"method={method}"]).method)
    after, terms = generator_loss(cfg.method)
    assert list(terms)[-1] == "energy" and terms["energy"].item() > 0
    assert torch.equal(after, before + 0.25 * terms["energy"])


def test_a_loss_term_from_config_is_checked_as_the_shipped_ones():
    term = f"{{_target_:{HERE}.FirstLayerEnergy,weight:-1}}"
    cfg = compose_config([f"+method.generator_terms.energy={term}"])
    with pytest.raises(UserError, match="method.generator_terms.energy.weight=-1 must be"):
        check_rules(cfg, "method")


def test_a_selection_rule_from_config_is_the_one_the_synthesizer_calls():
    cfg = compose_config(
        [
            "generator.width=8",
            "generator.nz=8",
            "trainer.batch_size=16",
            "trainer.student_steps=2",
            "runtime.device=cpu",
            "teacher.arch=digits_cnn_s",
        ],
        hydra_node=False,
    )
    OmegaConf.update(cfg, "selection", {"_target_": f"{HERE}.KeepFirstHalf"}, merge=False)
    torch.manual_seed(0)
    distiller = build_distiller(cfg, random_teacher(cfg.teacher), CPU)
    rule = distiller.synthesizer.selection
    assert isinstance(rule, KeepFirstHalf)
    distiller.iterate()  # two student steps and a generator step
    sums = distiller.meter.sums
    # half of each batch kept: two batches fill a student batch of 16
    assert float(sums[schema.KEPT]) == float(sums[schema.GENERATED]) / 2 == 32.0
    assert rule.calls and all(chunk == 16 for _, chunk in rule.calls)
    assert all(shape[0] % 16 == 0 and shape[1] == 10 for shape, _ in rule.calls)
    assert distiller.synthesizer.selection_rate == 0.5
