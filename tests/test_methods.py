"""Baseline methods through the same loop: objectives by hand, one digits epoch each."""

import json

import pytest
import torch
from conftest import CONF, options
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tadfkd import losses
from tadfkd.models import build_classifier
from tadfkd.objectives import GeneratorBatch
from tadfkd.train import train

METHODS = options("method")


def job_config(overrides):
    """The composed job config (no hydra node), as train() receives it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def small_batch():
    torch.manual_seed(0)
    return GeneratorBatch(
        images=torch.rand(4, 1, 6, 6),
        student_logits=torch.randn(3, 5),
        teacher_logits=torch.randn(3, 5),
        bn_statistics=torch.tensor(0.3),
        teacher_features=torch.randn(3, 7),
    )


def by_hand(method: str, b: GeneratorBatch) -> torch.Tensor:
    """Each method's generator loss written out from its paper's formula."""
    s, t = b.student_logits, b.teacher_logits
    prior, tv, l2 = (
        losses.class_prior(t),
        losses.total_variation(b.images),
        losses.l2_prior(b.images),
    )
    tadfkd = losses.adversarial_js(s, t, 3.0) + 10 * b.bn_statistics + 1.5e-5 * tv + 6e-3 * l2
    activation = -b.teacher_features.abs().mean()
    entropy = losses.information_entropy(t)
    return {
        "tadfkd": tadfkd,
        "basic": tadfkd,
        "tadfkd_prior": tadfkd + prior,
        "prior_noselect": tadfkd + prior,
        "dafl": prior + 0.1 * activation + 5 * entropy,
        "dafl_cifar10": 0.05 * prior + 0.01 * activation + 5 * entropy,
        "dafl_cifar100": 0.5 * prior + 0.1 * activation + 20 * entropy,
        "dfad": -(s - t).abs().mean(),
        "dfq": losses.adversarial_kl(s, t, 1.0)
        + b.bn_statistics
        + prior
        + 20 * losses.class_balance(t),
        "zskt": losses.adversarial_kl_element_mean(s, t, 1.0),
    }[method]


@pytest.mark.parametrize("method", METHODS)
def test_generator_objective_matches_the_formula_of_its_paper(method):
    objective = instantiate(job_config([f"method={method}"]).method)
    batch = small_batch()
    total, _ = objective.generator(batch)
    assert total.item() == pytest.approx(by_hand(method, batch).item(), rel=1e-5)


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
    kl = losses.student_kl_element_mean(student_logits, teacher_logits, 1.0)
    assert terms["attention"].item() > 0
    assert loss.item() == pytest.approx((kl + 250 * terms["attention"]).item(), rel=1e-5)
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
    sizes = objective._recorders["student"].by_resolution()
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
    stages = objective._recorders["teacher"].by_resolution()
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
    objective.weights = {name: 0.0 for name in objective.weights} | {"adversarial": 1.0}
    generator = torch.nn.Linear(4, 6)
    teacher = torch.nn.Linear(6, 5).requires_grad_(False)
    images = generator(torch.randn(8, 4))
    batch = GeneratorBatch(
        images=images.view(8, 1, 2, 3),
        student_logits=torch.randn(8, 5),
        teacher_logits=teacher(images),
        bn_statistics=None,
        teacher_features=None,
    )
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
    cfg = job_config(
        [
            f"method={method}",
            "trainer.epochs=1",
            "trainer.iters_per_epoch=2",
            "trainer.student_steps=2",
            "trainer.batch_size=32",
            "trainer.image_every=0",
            "logger=none",
        ]
    )
    results = train(cfg, tmp_path)
    assert results["method"] == method
    assert 0.0 <= results["student_final_acc"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["method"] == method
