"""The distillation loop on tiny models: refill, degenerate selections, one full epoch."""

import pytest
import torch
from torch import nn

from tadfkd.distill import Distiller, Schedule
from tadfkd.errors import UserError
from tadfkd.models import Generator, build_classifier
from tadfkd.objectives import Objective
from tadfkd.selection import GMMSelection, NoSelection
from tadfkd.views import Views

TADFKD_WEIGHTS = {"adversarial": 1.0, "bn": 10.0, "tv": 1.5e-5, "l2": 6e-3}


class KeepEvery:
    """A selection that keeps every n-th sample of each batch (or none), counting its calls."""

    enabled = True

    def __init__(self, every: int | None, max_batches: int = 32) -> None:
        self.every = every
        self.max_batches = max_batches
        self.calls = 0

    def keep_mask(self, logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        self.calls += 1
        keep = torch.zeros(logits.shape[0] // chunk_size, chunk_size, dtype=torch.bool)
        if self.every:
            keep[:, :: self.every] = True
        return keep.view(-1)


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    """Whether any parameter of ``module`` differs from the snapshot ``before``."""
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def make_distiller(selection, batch_size=16, objective=None, epochs=1) -> Distiller:
    torch.manual_seed(0)
    teacher = build_classifier("digits_cnn_s", 10, 1).eval().requires_grad_(False)
    student = build_classifier("digits_cnn_s", 10, 1)
    generator = Generator(nz=8, img_size=16, channels=1, width=8)
    student_optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    return Distiller(
        teacher=teacher,
        student=student,
        generator=generator,
        views=Views([0.5], [0.5], crop_padding=2, flip=False),
        selection=selection,
        objective=objective or Objective("tadfkd", weights=TADFKD_WEIGHTS),
        student_optimizer=student_optimizer,
        generator_optimizer=torch.optim.Adam(generator.parameters(), lr=1e-3),
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(student_optimizer, T_max=epochs),
        schedule=Schedule(
            epochs=epochs, iters_per_epoch=2, student_steps=2, batch_size=batch_size, nz=8
        ),
        device=torch.device("cpu"),
    )


def test_refill_generates_until_the_student_batch_is_full():
    selection = KeepEvery(3)  # keeps 6 of 16: three batches give 18 >= 16
    distiller = make_distiller(selection)
    batch = distiller.student_batch()
    assert batch.shape == (16, 1, 16, 16)
    # One batch first (no selection rate known yet), then the two it takes at 6 kept a batch.
    assert selection.calls == 2
    assert distiller.meter.sums["selection/kept"] == 18
    assert distiller.meter.sums["selection/generated"] == 48


def test_refill_is_bounded_and_trains_on_fewer_samples_when_it_must():
    selection = KeepEvery(8, max_batches=3)  # 2 kept a batch: 6 after the bound of 3 batches
    distiller = make_distiller(selection)
    assert distiller.student_batch().shape[0] == 6
    assert distiller.meter.sums["selection/generated"] == 48
    assert distiller.meter.sums["selection/short_student_batches"] == 1


def test_a_selection_that_never_keeps_anything_stops_with_a_clear_error():
    distiller = make_distiller(KeepEvery(None, max_batches=4))
    with pytest.raises(UserError, match="kept no generated sample in 4 batches"):
        distiller.student_batch()


def test_generator_step_with_fewer_than_two_kept_samples_is_skipped_and_counted():
    distiller = make_distiller(KeepEvery(16))  # one sample a batch
    before = snapshot(distiller.generator)
    distiller.generator_step()
    assert not changed(before, distiller.generator)
    assert distiller.meter.sums["selection/skipped_generator_steps"] == 1


def test_generator_step_updates_only_the_generator():
    distiller = make_distiller(GMMSelection())
    generator_before, student_before = snapshot(distiller.generator), snapshot(distiller.student)
    distiller.generator_step()
    assert changed(generator_before, distiller.generator)
    assert not changed(student_before, distiller.student)
    assert all(p.requires_grad for p in distiller.student.parameters())
    assert set(distiller.meter.sums) >= {"loss/adversarial", "loss/bn", "loss/tv", "loss/l2"}


def test_bn_term_is_computed_on_the_kept_samples_only():
    distiller = make_distiller(KeepEvery(2))
    seen = []
    first_bn = next(m for m in distiller.teacher.modules() if isinstance(m, nn.BatchNorm2d))
    first_bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    distiller.generator_step()
    # The selection forward sees 16 samples, the recorded (last) forward the 8 kept ones.
    assert seen == [16, 8]


def test_student_step_trains_the_student_towards_the_teacher():
    distiller = make_distiller(NoSelection(), objective=Objective("basic", weights=TADFKD_WEIGHTS))
    before = snapshot(distiller.student)
    distiller.student_step()
    assert changed(before, distiller.student)
    assert "loss/student" in distiller.meter.sums


def test_one_epoch_reports_losses_selection_rate_and_health():
    distiller = make_distiller(GMMSelection())
    loader = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    seen = {}
    accuracies = distiller.fit(loader, lambda epoch, metrics: seen.update(metrics), progress=False)
    assert len(accuracies) == 1 and 0.0 <= accuracies[0] <= 1.0
    assert 0.0 < seen["selection/rate"] <= 1.0
    for key in ("health/teacher_class_entropy", "health/teacher_confidence", "health/agreement"):
        assert 0.0 <= seen[key] <= 1.0
    assert seen["acc/student"] == accuracies[0]
    assert torch.isfinite(torch.tensor([v for v in seen.values()])).all()


@pytest.mark.parametrize(("offset", "first_lr"), [(False, 0.01), (True, 0.005)])
def test_cosine_schedule_steps_at_the_end_of_each_epoch_unless_published_offset(offset, first_lr):
    distiller = make_distiller(NoSelection(), epochs=2)
    distiller.schedule.published_scheduler_offset = offset
    loader = [(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)))]
    seen: dict[int, float] = {}
    distiller.fit(loader, lambda epoch, m: seen.setdefault(epoch, m["lr/student"]), False)
    assert seen[0] == pytest.approx(first_lr)
