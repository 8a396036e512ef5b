"""Every loss term against values computed by hand on small tensors."""

import math

import pytest
import torch
from torch import nn

from tadfkd import losses
from tadfkd.errors import UserError
from tadfkd.hooks import BNStatistics, LayerInputs
from tadfkd.objectives import GeneratorBatch, Objective


def test_student_l1_is_mean_absolute_difference():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 4.0], [3.0, 1.0]])
    assert losses.student_l1(s, t).item() == pytest.approx((1 + 2 + 0 + 3) / 4)


def test_jensen_shannon_by_hand():
    s = torch.tensor([[0.0, 0.0]])  # softmax -> (0.5, 0.5)
    t = torch.tensor([[3.0 * math.log(4.0), 0.0]])  # softmax(t / 3) -> (0.8, 0.2)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2])
    m = (p + q) / 2
    expected = 0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert losses.jensen_shannon(s, t, 3.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.adversarial_js(s, t).item() == pytest.approx(1 - expected.item(), rel=1e-5)


def test_jensen_shannon_clamps_probabilities_and_batch_means():
    s = torch.tensor([[100.0, 0.0], [0.0, 0.0]])  # (1, 0) clamps to (0.99, 0.01)
    t = torch.tensor([[0.0, 100.0], [0.0, 0.0]])
    p, q = torch.tensor([0.99, 0.01]), torch.tensor([0.01, 0.99])
    m = (p + q) / 2
    first = 0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    # The second sample agrees exactly (JS 0); batch-mean reduction halves the first's value.
    assert losses.jensen_shannon(s, t, 1.0).item() == pytest.approx(first.item() / 2, rel=1e-5)


def test_adversarial_l1_and_kl_signs():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert losses.adversarial_l1(s, t).item() == pytest.approx(-1.0)
    p_t = torch.softmax(t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s, 1))).sum()
    assert losses.adversarial_kl(s, t).item() == pytest.approx(-kl.item(), rel=1e-5)
    assert losses.student_kl(s, t).item() == pytest.approx(kl.item(), rel=1e-5)


def test_class_prior_information_entropy_activation():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])  # probs (.75,.25),(.25,.75)
    assert losses.class_prior(logits).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    # The batch-mean softmax is uniform: entropy log 2, loss -log 2.
    assert losses.information_entropy(logits).item() == pytest.approx(-math.log(2.0), rel=1e-6)
    assert losses.activation_loss(torch.tensor([[1.0, -3.0]])).item() == pytest.approx(-2.0)


def test_total_variation_and_l2_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    right = math.sqrt(1**2 + 2**2)  # 0-1, 2-4
    down = math.sqrt(2**2 + 3**2)  # 0-2, 1-4
    diagonal = abs(2.0 - 1.0)  # x[1,0] - x[0,1]
    anti_diagonal = abs(0.0 - 4.0)  # x[0,0] - x[1,1]
    expected = right + down + diagonal + anti_diagonal
    assert losses.total_variation(x).item() == pytest.approx(expected, rel=1e-6)
    assert losses.l2_prior(x).item() == pytest.approx(math.sqrt(0 + 1 + 4 + 16), rel=1e-6)


def test_attention_transfer_zero_for_identical_and_positive_otherwise():
    a = torch.randn(2, 3, 4, 4)
    assert losses.attention_transfer([a], [a]).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.attention_transfer([a], [torch.randn(2, 5, 4, 4)]).item() > 0


def test_bn_statistics_term_by_hand():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    recorder = BNStatistics(nn.Sequential(bn))
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[4.0, 2.0]], [[3.0, 3.0]]]])  # (2, 2, 1, 2)
    recorder.enabled = True
    bn(x)
    mean = torch.tensor([2.0, 2.0])  # channel 0: 0,2,4,2 ; channel 1: 1,1,3,3
    var = torch.tensor([2.0, 1.0])  # biased variances
    expected = (bn.running_var - var).norm() + (bn.running_mean - mean).norm()
    assert recorder.loss().item() == pytest.approx(expected.item(), rel=1e-6)


def test_bn_statistics_ignore_forwards_while_disabled():
    bn = nn.BatchNorm2d(1).eval()
    recorder = BNStatistics(bn)
    bn(torch.randn(4, 1, 2, 2))
    with pytest.raises(RuntimeError, match="not recorded"):
        recorder.loss()


def test_layer_inputs_records_penultimate_features():
    head = nn.Linear(3, 2)
    recorder = LayerInputs(head)
    x = torch.randn(4, 3)
    head(x)
    assert torch.equal(recorder.value, x)


def test_objective_weights_the_tadfkd_generator_terms():
    objective = Objective(
        "tadfkd", weights={"adversarial": 1.0, "bn": 10.0, "tv": 1.5e-5, "l2": 6e-3}
    )
    images = torch.rand(3, 1, 4, 4)
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    batch = GeneratorBatch(images, s, t, bn_statistics=torch.tensor(0.7), teacher_features=None)
    total, terms = objective.generator(batch)
    expected = (
        losses.adversarial_js(s, t, 3.0)
        + 10 * 0.7
        + 1.5e-5 * losses.total_variation(images)
        + 6e-3 * losses.l2_prior(images)
    )
    assert set(terms) == {"adversarial", "bn", "tv", "l2"}
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_objective_rejects_unknown_terms_and_losses():
    with pytest.raises(UserError, match="unknown term"):
        Objective("x", weights={"adversarial": 1.0, "typo": 1.0})
    with pytest.raises(UserError, match="student_loss"):
        Objective("x", student_loss="l3")
    with pytest.raises(UserError, match="adversarial"):
        Objective("x", adversarial="wasserstein")
