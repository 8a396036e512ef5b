"""Each method's networks are fed as its public code feeds them (``method.inputs``): which view
of the generated images reaches the student, the generator's mode when it samples the student's
batches, the student's mode in the generator step, and which noise the student batches use.

Every check records what actually reaches the networks through forward hooks during real
iterations of the project's distiller, so a change of the pipeline fails it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config, tiny_distiller

from tadfkd.base.errors import UserError
from tadfkd.distillation.objectives import Objective
from tadfkd.distillation.terms import StudentL1
from tadfkd.run.checks import validate


def record(distiller) -> list[tuple]:
    """Hooks appending, in call order, ("generator", its mode, grad enabled, noise, images) and
    ("student", its mode, grad enabled, input) for every forward of those two networks."""
    events: list[tuple] = []
    generator, student = distiller.synthesizer.generator, distiller.student

    def on_generator(module, inputs, output):
        grad = torch.is_grad_enabled()
        events.append(("generator", module.training, grad, inputs[0].clone(), output.detach()))

    def on_student(module, inputs):
        grad = torch.is_grad_enabled()
        events.append(("student", module.training, grad, inputs[0].detach().clone()))

    generator.register_forward_hook(on_generator)
    student.register_forward_pre_hook(on_student)
    return events


def same_samples(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two batches hold the same samples, in any order (the refill's fill order
    shuffles the kept samples of a student batch)."""
    return torch.equal(torch.unique(a.flatten(1), dim=0), torch.unique(b.flatten(1), dim=0))


def student_steps(events: list[tuple]) -> list[tuple[tuple, tuple]]:
    """(generator forward, student forward) pairs of the student steps: a no-grad generator
    forward followed by a student forward with gradients (the student step's)."""
    pairs = []
    for before, after in zip(events, events[1:], strict=False):
        if before[0] == "generator" and not before[2] and after[0] == "student" and after[2]:
            pairs.append((before, after))
    return pairs


@pytest.mark.parametrize("method", ["dafl", "dfad", "dfq", "zskt"])
def test_a_baseline_student_trains_on_the_plain_normalised_generator_output(method):
    distiller = tiny_distiller(f"method={method}")
    events = record(distiller)
    distiller.iterate()
    distiller.iterate()
    views = distiller.synthesizer.views
    pairs = student_steps(events)
    assert len(pairs) == 2 * distiller.schedule.student_steps
    for generated, seen in pairs:
        # no crop, no flip: exactly the test view (normalisation only) of what was generated
        assert same_samples(seen[3], views.test_view(generated[4]))


def test_tadfkd_trains_on_the_train_view_of_its_generated_batch(monkeypatch):
    distiller = tiny_distiller("method=basic")  # TA-DFKD's inputs, no selection: one batch a step
    views = distiller.synthesizer.views
    produced: list[torch.Tensor] = []
    original = views.train_view

    def train_view(images, generator=None):
        produced.append(original(images, generator))
        return produced[-1]

    monkeypatch.setattr(views, "train_view", train_view)
    events = record(distiller)
    distiller.iterate()
    pairs = student_steps(events)
    assert len(pairs) == distiller.schedule.student_steps
    for index, (_generated, seen) in enumerate(pairs):
        assert same_samples(seen[3], produced[index])
    # the generator step's networks see the train view too (the last one made)
    assert len(produced) == distiller.schedule.student_steps + 1


def test_dfq_samples_in_eval_mode_and_runs_its_generator_step_with_the_student_in_eval():
    distiller = tiny_distiller("method=dfq")
    events = record(distiller)
    distiller.iterate()
    sampling = [e for e in events if e[0] == "generator" and not e[2]]
    stepping = [e for e in events if e[0] == "generator" and e[2]]
    assert sampling and all(not training for _, training, *_ in sampling)
    assert len(stepping) == 1 and stepping[0][1]  # the generator step trains in train mode
    student_in_step = [e for e in events if e[0] == "student" and e[2]][-1]
    assert not student_in_step[1]
    # both networks are back in train mode after the iteration
    assert distiller.synthesizer.generator.training and distiller.student.training


@pytest.mark.parametrize("method", ["tadfkd", "dafl", "dfad", "zskt"])
def test_other_methods_sample_and_step_in_train_mode(method):
    distiller = tiny_distiller(f"method={method}")
    events = record(distiller)
    distiller.iterate()
    assert all(e[1] for e in events)


def test_zskt_student_batches_reuse_the_noise_of_the_last_generator_step():
    distiller = tiny_distiller("method=zskt")
    events = record(distiller)
    distiller.iterate()
    distiller.iterate()
    generator_calls = [e for e in events if e[0] == "generator"]
    steps = distiller.schedule.student_steps
    first_step = generator_calls[steps]  # after the first iteration's student batches
    assert first_step[2]  # the generator step (with gradients)
    following = generator_calls[steps + 1 : 2 * steps + 1]
    assert len(following) == steps
    for call in following:
        assert torch.equal(call[3], first_step[3])


def test_fresh_noise_methods_draw_new_noise_for_every_student_batch():
    distiller = tiny_distiller("method=dfad")
    events = record(distiller)
    distiller.iterate()
    noises = [e[3] for e in events if e[0] == "generator"]
    assert all(not torch.equal(a, b) for a, b in zip(noises, noises[1:], strict=False))


def test_inputs_are_checked_with_one_sentence():
    with pytest.raises(UserError, match="method.inputs has unknown key"):
        Objective("x", StudentL1(), {}, inputs={"augmentation": False})
    with pytest.raises(UserError, match="method.inputs.sample_mode='test' is unknown"):
        Objective("x", StudentL1(), {}, inputs={"sample_mode": "test"})
    with pytest.raises(UserError, match="must be train or eval"):
        validate(compose_config(["method.inputs.student_mode=half"], hydra_node=False))
    with pytest.raises(UserError, match="selection refill cannot"):
        tiny_distiller("method=zskt", "selection=gmm")
