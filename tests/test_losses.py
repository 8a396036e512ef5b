"""Every loss term against values computed by hand on small tensors."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tadfkd.base.errors import UserError
from tadfkd.bench.published import published_bn_statistics_term
from tadfkd.distillation import losses
from tadfkd.distillation import terms as T
from tadfkd.distillation.objectives import Objective
from tadfkd.distillation.recorders import ForwardHooks, bn_statistics_term


def test_student_l1_is_mean_absolute_difference():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 4.0], [3.0, 1.0]])
    assert losses.student_l1(s, t).item() == pytest.approx((1 + 2 + 0 + 3) / 4)


def published_adversarial_js(s: torch.Tensor, t: torch.Tensor, temperature: float = 3.0):
    """TA-DFKD's published ``JS_divergence``, step by step as its code does it: M from the
    unclamped softmaxes, three clamps, PyTorch's own ``KLDivLoss()`` with its default
    reduction ('mean', over all N x K entries), then 1 - clamp(D, 0, 1)."""
    p = torch.softmax(s / temperature, dim=1)
    q = torch.softmax(t / temperature, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns that 'mean' will change meaning
        kl = nn.KLDivLoss()
        divergence = 0.5 * kl(p.log(), m) + 0.5 * kl(q.log(), m)
    return 1.0 - divergence.clamp(0.0, 1.0)


def logit_pairs(num_classes: int, scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (16, num_classes)
    s = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    t = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return s.requires_grad_(), t.requires_grad_()


@pytest.mark.parametrize("num_classes", [10, 100, 200])
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])  # soft, moderate and saturated logits
def test_adversarial_js_value_and_gradients_equal_the_published_formula(num_classes, scale):
    for seed in range(3):
        s, t = logit_pairs(num_classes, scale, seed)
        ours = losses.adversarial_js(s, t, 3.0)
        s_ref, t_ref = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
        reference = published_adversarial_js(s_ref, t_ref, 3.0)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-12)
        ours.backward()
        reference.backward()
        for mine, theirs in ((s.grad, s_ref.grad), (t.grad, t_ref.grad)):
            assert torch.allclose(mine, theirs, rtol=1e-6, atol=1e-15)


def test_adversarial_js_clamps_to_no_gradient_where_the_published_value_does():
    # 200 soft classes: the clamped "divergence" is negative, so the term is 1 with no gradient.
    s, t = logit_pairs(200, 0.1, seed=0)
    assert published_adversarial_js(s, t).item() == 1.0
    value = losses.adversarial_js(s, t, 3.0)
    value.backward()
    assert value.item() == 1.0
    assert not s.grad.any() and not t.grad.any()


def test_adversarial_js_averages_over_every_entry_not_the_batch():
    # One disagreeing pair of 2 classes: D = (KL(M||P) + KL(M||Q)) / 2 summed, then / (N * K).
    s = torch.tensor([[100.0, 0.0]], dtype=torch.float64)  # softmax (1, 0) clamps to (.99, .01)
    t = torch.tensor([[0.0, 100.0]], dtype=torch.float64)
    p = torch.tensor([0.99, 0.01], dtype=torch.float64)
    q = torch.tensor([0.01, 0.99], dtype=torch.float64)
    m = torch.tensor([0.5, 0.5], dtype=torch.float64)  # from the unclamped (1, 0) and (0, 1)
    kl_mp = (m * (m / p).log()).sum()
    kl_mq = (m * (m / q).log()).sum()
    expected = 0.5 * (kl_mp + kl_mq) / 2  # N * K = 2 entries
    assert losses.jensen_shannon(s, t, 1.0).item() == pytest.approx(expected.item(), rel=1e-9)


def _quiet_kl_div(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns about reduction='mean'
        return F.kl_div(*args, **kwargs)


# Each baseline term as its public code writes it (float64 here), against ours.
PUBLISHED_TERMS = {
    # DAFL's kdloss: F.kl_div(log_softmax(y), softmax(t), size_average=False) / batch size
    "dafl_kd": (
        lambda s, t: losses.student_kl(s, t, 1.0),
        lambda s, t: F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="sum") / s.shape[0],
    ),
    # the CMI benchmark's KLDiv(T=1): batchmean times T^2; DFQ's adversarial term is its negative
    "cmi_adversarial": (
        lambda s, t: losses.adversarial_kl(s, t, 1.0),
        lambda s, t: -F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean"),
    ),
    # ZSKT: F.kl_div(log_softmax(s / T), softmax(t / T)) with the default reduction 'mean'
    "zskt_kd": (
        lambda s, t: losses.student_kl_element_mean(s, t, 1.0),
        lambda s, t: _quiet_kl_div(F.log_softmax(s, 1), F.softmax(t, 1)),
    ),
    "zskt_adversarial": (
        lambda s, t: losses.adversarial_kl_element_mean(s, t, 1.0),
        lambda s, t: -_quiet_kl_div(F.log_softmax(s, 1), F.softmax(t, 1)),
    ),
    # DAFL's information entropy: (p * torch.log10(p)).sum() of the batch-mean softmax
    "dafl_information_entropy": (
        lambda s, t: losses.information_entropy(t),
        lambda s, t: (F.softmax(t, 1).mean(0) * torch.log10(F.softmax(t, 1).mean(0))).sum(),
    ),
    # the CMI benchmark's balance: the same with the natural logarithm
    "cmi_balance": (
        lambda s, t: losses.class_balance(t),
        lambda s, t: (F.softmax(t, 1).mean(0) * torch.log(F.softmax(t, 1).mean(0))).sum(),
    ),
    # DAFL's one-hot loss: cross-entropy against the teacher's own arg-max
    "one_hot": (
        lambda s, t: losses.class_prior(t),
        lambda s, t: F.cross_entropy(t, t.argmax(1)),
    ),
    # DFAD: -F.l1_loss(s, t) for the generator, F.l1_loss for the student (means over N x K)
    "dfad_adversarial": (
        lambda s, t: losses.adversarial_l1(s, t),
        lambda s, t: -F.l1_loss(s, t),
    ),
}


@pytest.mark.parametrize("term", sorted(PUBLISHED_TERMS))
@pytest.mark.parametrize("num_classes", [10, 100, 200])
def test_baseline_terms_and_gradients_equal_their_public_code(term, num_classes):
    ours_fn, published_fn = PUBLISHED_TERMS[term]
    for scale in (0.5, 3.0, 30.0):
        s, t = logit_pairs(num_classes, scale, seed=1)
        s_ref, t_ref = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
        ours, reference = ours_fn(s, t), published_fn(s_ref, t_ref)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-12)
        ours.backward()
        reference.backward()
        for mine, theirs in ((s.grad, s_ref.grad), (t.grad, t_ref.grad)):
            if theirs is None:
                assert mine is None or not mine.any()
            else:
                assert torch.allclose(mine, theirs, rtol=1e-6, atol=1e-15)


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
    # The batch-mean softmax is uniform: entropy log 2; DAFL's code uses log10, the CMI
    # benchmark's balance term the natural logarithm.
    assert losses.information_entropy(logits).item() == pytest.approx(-math.log10(2.0), rel=1e-6)
    assert losses.class_balance(logits).item() == pytest.approx(-math.log(2.0), rel=1e-6)
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
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[4.0, 2.0]], [[3.0, 3.0]]]])  # (2, 2, 1, 2)
    mean = torch.tensor([2.0, 2.0])  # channel 0: 0,2,4,2 ; channel 1: 1,1,3,3
    var = torch.tensor([2.0, 1.0])  # biased variances
    expected = (bn.running_var - var).norm() + (bn.running_mean - mean).norm()
    assert bn_statistics_term(bn, x).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_statistics_term_equals_the_published_formula_and_its_gradient(layout, dtype):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = (torch.randn(8, 6, 5, 5) * 3 + 1).to(dtype).contiguous(memory_format=layout)

    ours_input = x.clone().requires_grad_()
    reference_input = x.clone().requires_grad_()
    ours = bn_statistics_term(bn, ours_input)
    reference = published_bn_statistics_term(bn, reference_input)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # bf16 gradients are bf16-rounded
    torch.testing.assert_close(
        ours_input.grad.float(), reference_input.grad.float(), rtol=tolerance, atol=1e-5
    )


def test_hooks_by_path_record_inputs_outputs_and_only_forwards_with_gradients_when_asked():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    hooks = ForwardHooks(model)
    hooks.add("2", record="input")
    hooks.add("0", transform=lambda _module, out: out.sum(), with_grad_only=True)
    x = torch.randn(5, 3)
    with torch.no_grad():
        model(x)
        before_relu = model[0](x)
    features = torch.relu(before_relu)
    assert torch.equal(hooks["2"], features)  # the penultimate features
    with pytest.raises(RuntimeError, match="nothing was recorded at '0'"):
        hooks["0"]  # the no-grad forwards are not recorded
    model(x)
    assert hooks["0"].item() == pytest.approx(before_relu.sum().item(), rel=1e-6, abs=1e-6)
    assert set(hooks.take()) == {"0", "2"} and hooks.records == {}


def test_objective_weights_the_tadfkd_generator_terms():
    generator_terms = {
        "adversarial": T.AdversarialJS(1.0, temperature=3.0),
        "bn": T.BNStatistics(10.0),
        "tv": T.TotalVariation(1.5e-5),
        "l2": T.L2Prior(6e-3),
        "class_prior": T.ClassPrior(0.0),  # weight 0: left out, not computed
    }
    objective = Objective("tadfkd", T.StudentL1(), generator_terms)
    teacher = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 5))
    teacher.eval().requires_grad_(False)
    images = torch.rand(3, 1, 4, 4)
    objective.attach(teacher, nn.Identity())
    t = teacher(images)  # with gradients enabled: the hooks record the BN term
    s = torch.randn(3, 5)
    total, terms = objective.generator(T.GeneratorBatch(images, s, t))
    bn = bn_statistics_term(teacher[1], teacher[0](images))
    expected = (
        losses.adversarial_js(s, t, 3.0)
        + 10 * bn
        + 1.5e-5 * losses.total_variation(images)
        + 6e-3 * losses.l2_prior(images)
    )
    assert set(terms) == {"adversarial", "bn", "tv", "l2"}
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_objective_rejects_what_is_no_loss_term():
    with pytest.raises(UserError, match=r"method.generator_terms.typo is 1.0, not a loss term"):
        Objective("x", T.StudentL1(), {"adversarial": T.AdversarialL1(1.0), "typo": 1.0})
    with pytest.raises(UserError, match="generator_terms.bn is a node without a _target_"):
        Objective("x", T.StudentL1(), {"bn": {"weight": 1.0}})
    with pytest.raises(UserError, match="method.student_loss is 'l3', not a student loss"):
        Objective("x", "l3", {})
    with pytest.raises(
        UserError, match="method.student_loss is an instance of L1Loss, not a student loss"
    ):
        Objective("x", nn.L1Loss(), {})
