"""The distillation loop and its synthesizer on tiny models: refill, degenerate selections,
the generator step, one full epoch."""

import pytest
import torch
from helpers import KeepEvery, tiny_distiller
from torch import nn

from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.distillation.selection import GMMSelection


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    """Whether any parameter of ``module`` differs from the snapshot ``before``."""
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize(("refill", "rounds"), [("adaptive", 2), ("single", 3)])
def test_refill_generates_until_the_student_batch_is_full(refill, rounds):
    selection = KeepEvery(3)  # keeps 6 of 16: three batches give 18 >= 16
    synthesizer = tiny_distiller(f"speed.refill={refill}", selection=selection).synthesizer
    batch, counters = synthesizer.student_batch()
    assert batch.shape == (16, 1, 16, 16)
    # adaptive: one batch first (no selection rate known yet), then the two it takes at 6 kept
    # a batch, scored together; single: one batch a round
    assert selection.calls == rounds
    assert counters[schema.KEPT] == 18 and counters[schema.GENERATED] == 48


def test_refill_is_bounded_and_trains_on_fewer_samples_when_it_must():
    selection = KeepEvery(8, max_batches=3)  # 2 kept a batch: 6 after the bound of 3 batches
    batch, counters = tiny_distiller(selection=selection).synthesizer.student_batch()
    assert batch.shape[0] == 6
    assert counters[schema.GENERATED] == 48 and counters[schema.SHORT_STUDENT_BATCHES] == 1


def test_a_selection_that_never_keeps_anything_stops_with_a_clear_error():
    synthesizer = tiny_distiller(selection=KeepEvery(None, max_batches=4)).synthesizer
    with pytest.raises(UserError, match="kept no generated sample in 4 batches"):
        synthesizer.student_batch()


def generator_step(distiller) -> dict:
    return distiller.synthesizer.generator_step(distiller.student, distiller.objective)


def test_generator_step_with_fewer_than_two_kept_samples_is_skipped_and_counted():
    distiller = tiny_distiller(selection=KeepEvery(16))  # one sample a batch
    before = snapshot(distiller.synthesizer.generator)
    assert generator_step(distiller) == {schema.SKIPPED_GENERATOR_STEPS: 1.0}
    assert not changed(before, distiller.synthesizer.generator)


def test_generator_step_updates_only_the_generator():
    distiller = tiny_distiller(selection=GMMSelection())
    generator = distiller.synthesizer.generator
    generator_before, student_before = snapshot(generator), snapshot(distiller.student)
    metrics = generator_step(distiller)
    assert changed(generator_before, generator)
    assert not changed(student_before, distiller.student)
    assert all(p.requires_grad for p in distiller.student.parameters())
    terms = {schema.loss_key(term) for term in ("adversarial", "bn", "tv", "l2", "generator")}
    assert set(metrics) == terms


@pytest.mark.parametrize("fold", [True, False])
def test_bn_term_is_computed_on_the_kept_samples_only(fold):
    distiller = tiny_distiller(f"speed.fold_teacher_bn={fold}", selection=KeepEvery(2))
    seen = []
    first_bn = next(m for m in distiller.teacher.modules() if isinstance(m, nn.BatchNorm2d))
    first_bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    calls = []
    first_bn.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    generator_step(distiller)
    # The recorded forward (with gradients) is on the 8 kept samples; the selection's scoring
    # forward on all 16, without gradients, runs on the BN-folded copy when there is one.
    assert (seen, calls) == (([8], [True]) if fold else ([16, 8], [False, True]))


def test_student_step_trains_the_student_towards_the_teacher():
    distiller = tiny_distiller("method=basic")
    before = snapshot(distiller.student)
    distiller.student_step()
    assert changed(before, distiller.student)
    assert schema.STUDENT_LOSS in distiller.meter.sums


def test_one_epoch_reports_losses_selection_rate_and_health():
    distiller = tiny_distiller()
    loader = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    seen = {}
    accuracies = distiller.fit(loader, lambda epoch, metrics: seen.update(metrics), progress=False)
    assert len(accuracies) == 1 and 0.0 <= accuracies[0] <= 1.0
    assert 0.0 < seen[schema.SELECTION_RATE] <= 1.0
    for key in schema.HEALTH:
        assert 0.0 <= seen[key] <= 1.0
    assert seen[schema.STUDENT_ACC] == accuracies[0]
    for counter in schema.COUNTERS:
        assert seen[counter] == 0.0  # reported even when it never happened
    assert not set(schema.RATE_PARTS) & set(seen)
    assert torch.isfinite(torch.tensor([v for v in seen.values()])).all()


@pytest.mark.parametrize(("offset", "first_lr"), [(False, 0.01), (True, 0.005)])
def test_cosine_schedule_steps_at_the_end_of_each_epoch_unless_published_offset(offset, first_lr):
    distiller = tiny_distiller(
        "method=basic", "trainer.epochs=2", f"trainer.published_scheduler_offset={offset}"
    )
    loader = [(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)))]
    seen: dict[int, float] = {}
    distiller.fit(loader, lambda epoch, m: seen.setdefault(epoch, m[schema.LR_STUDENT]), False)
    assert seen[0] == pytest.approx(first_lr)
