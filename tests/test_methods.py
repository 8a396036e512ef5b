"""Baseline methods through the same loop: objectives by hand, one digits epoch each."""

import json

import pytest
import torch
from helpers import TinyTeacher, compose_config, options
from hydra.utils import instantiate
from torch import nn

from tadfkd.distillation import losses
from tadfkd.distillation.objectives import Objective
from tadfkd.distillation.recorders import bn_statistics_term
from tadfkd.distillation.terms import GeneratorBatch
from tadfkd.models import build_classifier
from tadfkd.run.context import JobContext
from tadfkd.run.job import distil

METHODS = options("method")


def job_config(overrides):
    """The composed job config (no hydra node), as ``distil`` receives it."""
    return compose_config(overrides, hydra_node=False)


def generator_terms(objective: Objective) -> tuple[torch.Tensor, dict]:
    """The objective's generator loss on one small batch, with what its hooks need: the
    tiny teacher's BN input statistics and penultimate features, recorded by its own hooks.
    Returns the loss and, for the formulas, (batch, BN term, features)."""
    torch.manual_seed(0)
    teacher = TinyTeacher().eval().requires_grad_(False)
    objective.attach(teacher, nn.Identity())
    images = torch.rand(3, 1, 6, 6)
    batch = GeneratorBatch(images, torch.randn(3, 5), teacher(images))
    total, _ = objective.generator(batch)
    with torch.no_grad():
        bn = bn_statistics_term(teacher.bn, teacher.conv(images))
        features = teacher.features(images)
    return total, {"batch": batch, "bn": bn, "features": features}


def by_hand(method: str, b: GeneratorBatch, bn: torch.Tensor, features: torch.Tensor):
    """Each method's generator loss written out from its public code's formula, summed in the
    order (and with the weights) of the objective before its terms were objects, so that the
    float result is the same to the last bit."""
    s, t = b.student_logits, b.teacher_logits
    prior, tv, l2 = (
        losses.class_prior(t),
        losses.total_variation(b.images),
        losses.l2_prior(b.images),
    )
    tadfkd = losses.adversarial_js(s, t, 3.0) + 10 * bn + 1.5e-5 * tv + 6e-3 * l2
    activation = losses.activation_loss(features)  # -mean |penultimate features|
    entropy = losses.information_entropy(t)
    return {
        "tadfkd": tadfkd,
        "basic": tadfkd,
        "tadfkd_prior": tadfkd + prior,
        "prior_noselect": tadfkd + prior,
        "dafl": prior + 0.1 * activation + 5 * entropy,
        "dafl_cifar10": 0.05 * prior + 0.01 * activation + 5 * entropy,
        "dafl_cifar100": 0.5 * prior + 0.1 * activation + 20 * entropy,
        "dfad": losses.adversarial_l1(s, t),
        "dfq": losses.adversarial_kl(s, t, 1.0) + bn + prior + 20 * losses.class_balance(t),
        "zskt": losses.adversarial_kl_element_mean(s, t, 1.0),
    }[method]


# Each method's student loss on logits (N, K), as before its loss was an object.
STUDENT_LOSS = {
    **dict.fromkeys(
        ("tadfkd", "basic", "tadfkd_prior", "prior_noselect", "dfad"), losses.student_l1
    ),
    **dict.fromkeys(
        ("dafl", "dafl_cifar10", "dafl_cifar100", "dfq"),
        lambda s, t: losses.student_kl(s, t, temperature=1.0),
    ),
    "zskt": lambda s, t: losses.student_kl_element_mean(s, t, temperature=1.0),
}


@pytest.mark.parametrize("method", METHODS)
def test_generator_objective_matches_the_formula_of_its_code(method):
    objective = instantiate(job_config([f"method={method}"]).method)
    total, parts = generator_terms(objective)
    expected = by_hand(method, parts["batch"], parts["bn"], parts["features"])
    assert torch.equal(total, expected), (total.item(), expected.item())
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"zskt"}))  # zskt: attention below
def test_student_objective_is_the_loss_of_its_code(method):
    objective = instantiate(job_config([f"method={method}"]).method)
    torch.manual_seed(0)
    s, t = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    loss, terms = objective.student(s, t)
    assert torch.equal(loss, STUDENT_LOSS[method](s, t)) and terms == {"student": loss}


@pytest.mark.parametrize(
    ("method", "selected"),
    [
        ("tadfkd", True),
        ("tadfkd_prior", True),
        ("basic", False),
        ("prior_noselect", False),
        ("dafl", False),
        ("dafl_cifar10", False),
        ("dafl_cifar100", False),
        ("dfad", False),
        ("dfq", False),
        ("zskt", False),
    ],
)
def test_which_samples_each_method_trains_on(method, selected):
    assert instantiate(job_config([f"method={method}"]).selection).enabled is selected


def test_zskt_student_loss_adds_attention_transfer_of_matching_stages():
    objective = instantiate(job_config(["method=zskt"]).method)
    teacher = build_classifier("digits_cnn_w", 10, 1).eval()
    student = build_classifier("digits_cnn_s", 10, 1)
    objective.attach(teacher, student)
    x = torch.randn(4, 1, 16, 16)
    teacher_logits = teacher(x)
    student_logits = student(x)
    loss, terms = objective.student(student_logits, teacher_logits)
    kl = STUDENT_LOSS["zskt"](student_logits, teacher_logits)
    assert terms["attention"].item() > 0
    assert torch.equal(loss, kl + 250 * terms["attention"])
    # Identical networks have identical attention maps: the term vanishes.
    objective.attach(teacher, teacher)
    logits = teacher(x)
    _, terms = objective.student(logits, logits)
    assert terms["attention"].item() == pytest.approx(0.0, abs=1e-7)


def test_zskt_stages_are_the_ends_of_each_resolution():
    objective = instantiate(job_config(["method=zskt"]).method)
    teacher, student = build_classifier("resnet18", 10), build_classifier("resnet18", 10)
    objective.attach(teacher, student)
    student(torch.randn(2, 3, 32, 32))
    sizes = objective._stages["student"].take()
    assert sorted(sizes) == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert sizes[(4, 4)].shape == (2, 512, 4, 4)  # the output of layer4


def test_zskt_stages_of_a_wide_resnet_are_its_block_outputs_as_in_zskt():
    objective = instantiate(job_config(["method=zskt"]).method)
    teacher, student = build_classifier("wrn16_2", 10), build_classifier("wrn16_1", 10)
    objective.attach(teacher, student)
    outputs = {}
    for name in ("block1", "block2", "block3"):
        getattr(teacher, name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)
        )
    teacher(torch.randn(2, 3, 32, 32))
    stages = objective._stages["teacher"].take()
    assert sorted(stages) == [(8, 8), (16, 16), (32, 32)]
    for size, name in (((32, 32), "block1"), ((16, 16), "block2"), ((8, 8), "block3")):
        assert stages[size] is outputs[name]  # not the final BN after block3


def test_dfq_uses_the_cmi_generator_betas_and_others_the_default():
    assert list(job_config(["method=dfq"]).optimizer.generator.betas) == [0.5, 0.999]
    assert "betas" not in job_config(["method=tadfkd"]).optimizer.generator


def tiny_generator_step(method: str) -> dict[str, torch.Tensor | None]:
    """One adversarial generator loss in which the student's logits are constants, so that the
    generator's only gradient path runs through the teacher: its gradients by parameter."""
    torch.manual_seed(0)
    objective = instantiate(job_config([f"method={method}"]).method)
    objective.terms = {"adversarial": objective.terms["adversarial"]}
    generator = torch.nn.Linear(4, 6)
    teacher = torch.nn.Linear(6, 5).requires_grad_(False)
    images = generator(torch.randn(8, 4))
    objective.attach(teacher, nn.Identity())
    batch = GeneratorBatch(images.view(8, 1, 2, 3), torch.randn(8, 5), teacher(images))
    loss, _ = objective.generator(batch)
    if loss.requires_grad:
        loss.backward()
    return {name: parameter.grad for name, parameter in generator.named_parameters()}


@pytest.mark.parametrize(
    ("method", "through_teacher"),
    [("tadfkd", True), ("tadfkd_prior", True), ("basic", False), ("prior_noselect", False)],
)
def test_adversarial_gradient_reaches_the_generator_through_the_teacher_as_published(
    method, through_teacher
):
    # The published selection branch keeps the teacher's logits in the graph; its basic
    # (no-selection) branch detaches them before the adversarial term.
    grads = tiny_generator_step(method)
    reached = any(grad is not None and grad.abs().sum() > 0 for grad in grads.values())
    assert reached is through_teacher


@pytest.mark.parametrize("experiment", ["cifar10", "cifar100", "tinyimagenet"])
def test_every_method_composes_and_builds_on_every_published_dataset(experiment):
    for method in METHODS:
        cfg = job_config([f"experiment={experiment}", f"method={method}"])
        assert instantiate(cfg.method).name == method
        assert cfg.dataset.name == experiment


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_one_digits_epoch_end_to_end(method, tmp_path):
    cfg = job_config(["debug=tiny", "runtime.device=cpu", f"method={method}"])
    results = distil(cfg, JobContext(tmp_path))
    assert results["method"] == method
    assert 0.0 <= results["student_final_acc"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["method"] == method
